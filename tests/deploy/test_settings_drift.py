"""No drift between what the code reads from the environment and what the deployment sets.

    .venv/bin/python -m pytest -q tests/deploy/test_settings_drift.py

Both directions, for every overlay (dev, prod, prod-multinode) and every container that
runs the image: the service's StatefulSet, the trainer's Deployment, and a TrainJob's pods
as Kubeflow Trainer builds them from the ClusterTrainingRuntime (deploy_support.trainjob_pods):
- every variable the code reads (the fields of core.contracts.Settings, the trainer's
  RLHF_<SECTION>_<FIELD> hyperparameters, and any other os.environ / os.getenv read in
  rlhf/, service/, trainer/, kernels/) is set by the image or the manifests, or listed
  below as deliberately left at its default (everywhere, or in one overlay), or as no
  deployment setting at all;
- every variable the image or the manifests set is read by the code (pydantic-settings
  ignores unknown RLHF_* names, so a typo there would otherwise pass silently), and every
  value parses.
A field added to Settings fails here until the manifests (or DEFAULTED) say what it is.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_support import OVERLAYS, ROOT, container_env, image_env, render, rlhf_containers

from rlhf_loop.core.contracts import Settings

CODE_DIRS = ("rlhf_loop",)

# Settings deliberately left at the code's default in every overlay, and why.
DEFAULTED = {
    "RLHF_NEW_LINEAGE": "an operator's one-off action on a store made from another model; never on by default",
    "RLHF_CHAT_TEMPLATE": "only for a base model without a template; the embedded model and instruct models carry theirs",
    "RLHF_DTYPE": "auto is bf16 on the CUDA trainer and fp32 on CPU replicas: right for both",
    "RLHF_HOST": "0.0.0.0 listens on the pod IP, which is what a Service needs",
    "RLHF_MAX_BODY_BYTES": "request limits are the public API's contract, tested with the service",
    "RLHF_MAX_MESSAGES": "request limit (API contract)",
    "RLHF_MAX_PROMPT_TOKENS": "request limit (API contract)",
    "RLHF_MAX_TOKENS_LIMIT": "request limit (API contract)",
    "RLHF_DEFAULT_MAX_TOKENS": "request default (API contract)",
    "RLHF_MAX_N": "request limit (API contract)",
    "RLHF_POLICY_POLL_S": "LATEST is re-read every 5 s only as a fallback to the policy-updates topic",
    "RLHF_NAMED_VERSIONS_KEPT": "two versions kept for requests that name one (A/B, evaluation); an operator with "
                                "memory to spare for full-weight versions raises it (docs/service.md)",
    "RLHF_TRAINER_GROUP": "one trainer per Kafka cluster; the default group name is as good as any",
    "RLHF_TRAIN_MIN_LABELS": "training cadence, tuned with the trainer",
    "RLHF_TRAIN_MAX_WAIT_S": "training cadence, tuned with the trainer",
    "RLHF_LATE_VOTE_WINDOW_S": "join window, tuned with the trainer (topic retention is far longer)",
    "RLHF_VOTE_RATE_LIMIT": "vote cap per voter (API contract; 60 a minute is far above a person's pace), tested with the service",
    "RLHF_VOTE_RATE_WINDOW_S": "the vote caps' window (API contract)",
    "RLHF_VOTE_KEY_RATE_LIMIT": "a key's default vote quota (3000 a minute: fifty users at the per-voter cap); an app "
                                "with more users gets its own in RLHF_API_KEYS (key=quota), a Secret",
}
# Settings one overlay leaves at the code's default while another sets them, and why.
DEFAULTED_IN = {
    "dev": {
        "RLHF_KAFKA_SASL_MECHANISM": "dev's single broker is PLAINTEXT (in-cluster, NetworkPolicy-fenced): no SASL",
        "RLHF_KAFKA_SASL_USERNAME": "no SASL in dev",
        "RLHF_KAFKA_SASL_PASSWORD": "no SASL in dev",
        "RLHF_KAFKA_SSL_CAFILE": "no TLS in dev",
    },
}

# The trainer's hyperparameters (trainer/config.py, env RLHF_<SECTION>_<FIELD>) stay at
# their documented, tested defaults unless an overlay sets one on the trainer.
TRAINER_HYPERPARAMETERS = "defaults documented and tuned in trainer/config.py"

# Variables the code reads that are no deployment setting, and why they stay unset.
NOT_DEPLOYMENT_SETTINGS = {
    "TRITON_INTERPRET": "runs Triton kernels on CPU tensors in the kernel tests; pods run them compiled on the GPU",
    "RUST_LOG": "log level of the embedded tansu broker, which only `rlhf up` and the tests start",
    "RLHF_TRAINER_PAUSE_AT": "kill points for the trainer's kill-and-resume test",
    "RLHF_TRAINER_PAUSE_RANK": "which rank pauses at a kill point in the distributed kill test",
    "RANK": "set by torchrun for each trainer rank (trainer/dist.py)",
    "WORLD_SIZE": "set by torchrun",
    "LOCAL_RANK": "set by torchrun",
    "TORCHELASTIC_RESTART_COUNT": "set by torchrun; a kill point pauses only the first attempt, and it prefixes "
                                  "each attempt's rendezvous keys",
    "TORCHELASTIC_RUN_ID": "set by torchrun: the job, whose --once round a restart of it does not repeat",
    "MASTER_ADDR": "set by torchrun (or Kubeflow Trainer's PET_* -> torchrun): the rendezvous store",
    "MASTER_PORT": "set by torchrun",
    "TORCHELASTIC_USE_AGENT_STORE": "set by torchrun: whether its agent hosts the rendezvous store",
}

# Third-party variables the image or the manifests set without the project reading them.
THIRD_PARTY = {
    "PATH": "the image puts its venv first",
    "PYTHONUNBUFFERED": "log lines reach `kubectl logs` as they happen",
    "OMP_NUM_THREADS": "torch's thread pool, sized to the pod's CPU request",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "torchrun's wait for its ranks to stop on SIGTERM, inside the trainer's grace period",
}


# ---------------------------------------------------------------------------- what the code reads


@dataclass(frozen=True)
class EnvRead:
    where: str  # path:line
    name: str | None  # None: computed at run time


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (isinstance(node, ast.Name) and node.id == "environ")


def env_reads(root: Path = ROOT) -> list[EnvRead]:
    """Every os.environ / os.getenv read in the project's code, with the name when it is static."""
    reads = []
    for directory in CODE_DIRS:
        for path in sorted((root / directory).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                         for t in n.targets if isinstance(t, ast.Name)
                         and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
            for node in sorted(ast.walk(tree), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0))):
                key = None
                if isinstance(node, ast.Call) and node.args:
                    f = node.func
                    if isinstance(f, ast.Attribute) and (
                        (f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id == "os")
                        or (f.attr in {"get", "setdefault", "pop"} and _is_environ(f.value))
                    ):
                        key = node.args[0]
                elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
                    key = node.slice
                if key is None:
                    continue
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    name = key.value
                elif isinstance(key, ast.Name) and key.id in constants:
                    name = constants[key.id]
                else:
                    name = None
                reads.append(EnvRead(f"{path.relative_to(root)}:{node.lineno}", name))
    return reads


def settings_env() -> set[str]:
    return {f"RLHF_{name.upper()}" for name in Settings.model_fields}


def trainer_env() -> set[str]:
    """RLHF_<SECTION>_<FIELD> for every field of every section of trainer.config.TrainerConfig."""
    from rlhf_loop.trainer.config import TrainerConfig

    names = set()
    sections = typing.get_type_hints(TrainerConfig)
    for section in dataclasses.fields(TrainerConfig):
        for f in dataclasses.fields(sections[section.name]):
            names.add(f"RLHF_{section.name.upper()}_{f.name.upper()}")
    return names


# Reads whose name is computed, and the function that lists the names they can read.
COMPUTED_READS = {"rlhf_loop/trainer/config.py": trainer_env}


def code_env() -> dict[str, str]:
    """name -> where it is read, for everything the code can read from the environment."""
    names = {n: "core/contracts.py Settings" for n in settings_env()}
    for read in env_reads():
        if read.name is not None:
            names.setdefault(read.name, read.where)
            continue
        path = read.where.rpartition(":")[0]
        if path not in COMPUTED_READS:
            pytest.fail(f"{read.where} reads an environment variable whose name is computed: read it through "
                        "rlhf_loop.core.contracts.Settings, or teach tests/deploy/test_settings_drift.py (COMPUTED_READS) "
                        "which names it can read")
        for name in COMPUTED_READS[path]():
            names.setdefault(name, read.where)
    return names


# ---------------------------------------------------------------------------- what the deployment sets


def deployed_env(overlay: str) -> dict[str, dict[str, str]]:
    """container name -> its environment (image ENV + envFrom + env) in this overlay."""
    objs = render(overlay)
    return {f"{w['metadata']['name']}/{c['name']}": container_env(objs, c, image_env()) for w, c in rlhf_containers(objs)}


# ---------------------------------------------------------------------------- the tests


def test_the_scan_finds_the_reads_it_must():
    reads = {r.name for r in env_reads()}
    # app/cli.py sets these when absent: the scan sees setdefault as a read
    assert {"BENTOML_DO_NOT_TRACK", "HF_HUB_OFFLINE"} <= reads
    assert not settings_env() & trainer_env(), "one variable, two meanings: a trainer hyperparameter shadows a setting"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_the_code_reads_is_deployed(overlay):
    deployed = set().union(*deployed_env(overlay).values())
    missing = sorted(settings_env() - deployed - set(DEFAULTED) - set(DEFAULTED_IN.get(overlay, {})))
    assert not missing, (f"{overlay}: the code reads {missing} but the deployment neither sets them "
                         "(k8s/base/config.env, an overlay's config.env, a pod spec, the Dockerfile) "
                         "nor lists them in DEFAULTED or DEFAULTED_IN with a reason")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_other_variable_the_code_reads_is_accounted_for(overlay):
    deployed = set().union(*deployed_env(overlay).values())
    unaccounted = {name: where for name, where in code_env().items()
                   if name not in settings_env() | trainer_env() | deployed | set(NOT_DEPLOYMENT_SETTINGS)}
    assert not unaccounted, (f"{overlay}: read by the code but neither deployed nor listed in "
                             f"NOT_DEPLOYMENT_SETTINGS: {unaccounted}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_the_deployment_sets_is_read(overlay):
    read = set(code_env())
    for container, env in deployed_env(overlay).items():
        unread = sorted(set(env) - read - set(THIRD_PARTY))
        assert not unread, f"{overlay} {container}: sets {unread}, which no code reads (a typo, or a setting that was removed)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployed_value_parses(overlay):
    from rlhf_loop.trainer.config import from_args

    for container, env in deployed_env(overlay).items():
        fields = {k[len("RLHF_"):].lower(): v for k, v in env.items()
                  if k in settings_env() and not v.startswith("secret:")}
        Settings(**fields)  # raises on a value its field refuses (e.g. RLHF_DEVICE=gpu)
        from_args(None, environ=env)


def test_allow_lists_are_current():
    read = code_env()
    assert not set(DEFAULTED) - settings_env(), f"DEFAULTED names settings that no longer exist: {set(DEFAULTED) - settings_env()}"
    assert set(DEFAULTED_IN) <= set(OVERLAYS), f"DEFAULTED_IN names overlays that do not exist: {set(DEFAULTED_IN) - set(OVERLAYS)}"
    for overlay, names in DEFAULTED_IN.items():
        assert not set(names) - settings_env(), f"DEFAULTED_IN[{overlay!r}] names settings that no longer exist"
        assert not set(names) & set(DEFAULTED), "a setting defaulted everywhere belongs in DEFAULTED only"
    assert not set(NOT_DEPLOYMENT_SETTINGS) - set(read), f"no code reads {set(NOT_DEPLOYMENT_SETTINGS) - set(read)} any more"
    for overlay in OVERLAYS:
        deployed = set().union(*deployed_env(overlay).values())
        assert not set(DEFAULTED) & deployed, f"{overlay} sets {set(DEFAULTED) & deployed}: take them out of DEFAULTED"
        stale = set(DEFAULTED_IN.get(overlay, {})) & deployed
        assert not stale, f"{overlay} sets {stale}: take them out of DEFAULTED_IN[{overlay!r}]"
        assert not set(NOT_DEPLOYMENT_SETTINGS) & deployed, f"{overlay} sets {set(NOT_DEPLOYMENT_SETTINGS) & deployed}"
        assert set(THIRD_PARTY) <= deployed, f"THIRD_PARTY lists {set(THIRD_PARTY) - deployed}, which nothing sets"


def test_every_container_that_runs_the_image_is_covered():
    """The service, the trainer Deployment, and where one trains, the TrainJob's pods (container `node`)."""
    assert set(deployed_env("prod")) == {"rlhf-service/service", "rlhf-trainer/trainer"}
    assert set(deployed_env("prod-multinode")) == {"rlhf-service/service", "rlhf-trainer/trainer", "rlhf-trainer/node"}


def test_image_sets_what_the_cli_would_default():
    env = image_env()
    # the CLI sets these only for `rlhf ...`; the image makes them hold for every process
    assert env["BENTOML_DO_NOT_TRACK"] == "true" and env["HF_HUB_OFFLINE"] == "1"


def test_scan_sees_reads_of_every_form(tmp_path):
    (tmp_path / "rlhf_loop").mkdir()
    (tmp_path / "rlhf_loop" / "m.py").write_text(
        "import os\nfrom os import environ\nNAME = 'C'\n"
        "os.getenv('A')\nos.environ['B']\nos.environ.get(NAME)\nenviron.setdefault('D', '1')\n"
        "os.environ['E'] = '1'\nos.environ.get(f'X_{NAME}')\n"
    )
    assert [(r.where, r.name) for r in env_reads(tmp_path)] == [
        ("rlhf_loop/m.py:4", "A"), ("rlhf_loop/m.py:5", "B"), ("rlhf_loop/m.py:6", "C"), ("rlhf_loop/m.py:7", "D"), ("rlhf_loop/m.py:9", None)]
