"""What the deploy tests share: rendered overlays, the parsed Dockerfile, a pod's environment.

Nothing here asserts; the test files do. Overlays are rendered with the real
`kubectl kustomize` (kustomize v5), exactly what `kubectl apply -k` sends.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DASHBOARD = K8S / "base" / "grafana" / "rlhf-loop.json"  # also the ConfigMap rlhf-grafana-dashboard
OVERLAYS = tuple(sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists()))
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# Strimzi's and Kubeflow Trainer's CRDs live beside the clone (CI puts them there), never
# inside the project.
STRIMZI_CRDS = ROOT.parent / "shared" / "strimzi-crds"
KUBEFLOW_TRAINER_CRDS = ROOT.parent / "shared" / "kubeflow-trainer-crds"
# API group -> where its CRDs are; objects of these groups are validated against them.
CRD_DIRS = {"kafka.strimzi.io": STRIMZI_CRDS, "trainer.kubeflow.org": KUBEFLOW_TRAINER_CRDS}
K8S_VERSION = "1.32.0"  # the Kubernetes API the manifests are validated against
IMAGE = "rlhf-loop"  # the image name in k8s/base before an overlay's `images:` renames it


# ---------------------------------------------------------------------------- manifests


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    """Every object `kubectl kustomize k8s/overlays/<overlay>` renders."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: the deploy tests render the overlays with `kubectl kustomize` "
                    "(kubectl >= 1.27, kustomize v5 built in). CI has it; install it from "
                    "https://kubernetes.io/docs/tasks/tools/ to run these tests.")
    proc = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def of_kind(objs, kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def get(objs, kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def by_generated_name(objs, kind: str, name: str) -> dict:
    """A ConfigMap/Secret kustomize generated as `name` (it appends a content hash)."""
    found = [o for o in objs if o["kind"] == kind and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} generated from {name}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    return pod_spec(workload)["containers"]


WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def workload(objs, name: str) -> dict:
    """The Deployment or StatefulSet called `name` (the service is a StatefulSet, the trainer a Deployment)."""
    found = [o for o in objs if o["kind"] in {"Deployment", "StatefulSet"} and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one Deployment or StatefulSet {name}, found {len(found)}"
    return found[0]


def workloads(objs) -> list[dict]:
    """Everything that runs pods: the built-in workloads, and each TrainJob as trainjob_pods() sees it."""
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS] + [trainjob_pods(objs, t) for t in of_kind(objs, "TrainJob")]


def rlhf_containers(objs) -> list[tuple[dict, dict]]:
    """(workload, container) for every container that runs the project's image (`rlhf <cmd>`)."""
    out = []
    for w in workloads(objs):
        for c in containers(w):
            if c["image"].rsplit(":", 1)[0].rsplit("/", 1)[-1] == IMAGE:
                out.append((w, c))
    return out


def the_container(objs, name: str) -> tuple[dict, dict]:
    w = workload(objs, name)
    (c,) = containers(w)
    return w, c


# ---------------------------------------------------------------------------- Kubeflow Trainer

# What Kubeflow Trainer's torch policy injects into the container `node` of the trainer Job
# (pkg/runtime/framework/plugins/torch/torch.go at the commit the CRDs come from); torchrun
# reads each PET_<FLAG> as the default of its --<flag>. Users may not set them.
TORCHRUN_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
TRAINER_PORT = 29500  # Kubeflow Trainer's rendezvous port (PET_MASTER_PORT)
TRAINER_ANCESTOR = {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}


def runtime_of(objs, trainjob: dict) -> dict:
    ref = trainjob["spec"]["runtimeRef"]
    assert ref.get("kind", "ClusterTrainingRuntime") == "ClusterTrainingRuntime", ref
    return get(objs, "ClusterTrainingRuntime", ref["name"])


def trainer_job(runtime: dict) -> dict:
    """The runtime's replicated Job that Kubeflow Trainer sizes and configures (ancestor step `trainer`)."""
    (rjob,) = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]
               if r["template"].get("metadata", {}).get("labels", {}).items() >= TRAINER_ANCESTOR.items()]
    return rjob


def trainjob_pods(objs, trainjob: dict) -> dict:
    """A TrainJob as a workload: the pod template Kubeflow Trainer builds from its runtime.

    The runtime's trainer Job's pod, with the TrainJob's trainer.image/command/args over the
    container `node`, its env added (by name) and resourcesPerNode merged key by key over
    the runtime's resources (Kubeflow Trainer's jobset builder and
    trainingruntime.MergeResourceRequirements). Without the PET_* variables it adds at run
    time (TORCHRUN_ENV): the tests check the command that reads them instead.
    """
    trainer = trainjob["spec"].get("trainer", {})
    template = copy.deepcopy(trainer_job(runtime_of(objs, trainjob))["template"]["spec"]["template"])
    (node,) = [c for c in template["spec"]["containers"] if c["name"] == "node"]
    for key in ("image", "command", "args"):
        if key in trainer:
            node[key] = trainer[key]
    env = {e["name"]: e for e in node.get("env", [])}
    env.update({e["name"]: e for e in trainer.get("env", [])})
    node["env"] = list(env.values())
    for kind, values in trainer.get("resourcesPerNode", {}).items():
        node.setdefault("resources", {}).setdefault(kind, {}).update(values)
    return {"apiVersion": trainjob["apiVersion"], "kind": "TrainJob", "metadata": trainjob["metadata"],
            "spec": {"replicas": trainer.get("numNodes", 1), "trainer": trainer, "template": template}}


def running(w: dict) -> bool:
    """Whether a workload runs pods as rendered: replicas not 0 (a missing count is the autoscaler's), not suspended."""
    return w["spec"].get("replicas", 1) != 0 and not w["spec"].get("suspend", False)


# ---------------------------------------------------------------------------- CRD schemas


def strict(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema that rejects fields it does not name.

    Structural schemas prune unknown fields silently; `kubectl apply` (strict field
    validation) reports them. x-kubernetes-preserve-unknown-fields keeps a map open
    (e.g. Kafka `config`), nullable admits null, int-or-string admits both. CEL rules
    (x-kubernetes-validations) are not evaluated: the tests check the ones that matter by hand.
    """
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict(s["items"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            s[key] = [strict(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string"):
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    return s


@functools.cache
def crd_schemas(group: str) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict schema of every served version of every CRD of `group`.

    Skips the calling test, saying so, when the CRDs are not beside the clone.
    """
    directory = CRD_DIRS[group]
    if not directory.is_dir():
        pytest.skip(f"{group} CRDs not found at {directory} (CI keeps a copy beside the clone): "
                    f"this overlay's {group} objects are not schema-checked on this machine")
    schemas = {}
    for path in sorted(directory.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if crd and crd.get("kind") == "CustomResourceDefinition" and crd["spec"]["group"] == group:
                for version in crd["spec"]["versions"]:
                    if version["served"]:
                        key = (f"{group}/{version['name']}", crd["spec"]["names"]["kind"])
                        schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    assert schemas, f"no {group} CRDs in {directory}"
    return schemas


def crd_errors(obj: dict) -> list[str]:
    """Where `obj` breaks the schema of its CRD (strict: unknown fields are errors)."""
    schemas = crd_schemas(obj["apiVersion"].split("/")[0])
    key = (obj["apiVersion"], obj["kind"])
    if key not in schemas:
        return [f"{obj['kind']}/{obj['metadata']['name']}: no served CRD version for {key} (have {sorted(schemas)})"]
    validator = jsonschema.Draft4Validator(schemas[key])
    return [f"{obj['kind']}/{obj['metadata']['name']} at {'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)]


def container_env(objs, container: dict, image_env: dict[str, str]) -> dict[str, str]:
    """The environment the process sees: image ENV, then envFrom, then env (later wins).

    Values from a Secret read as `secret:<name>/<key>`: the tests check where they come
    from, never what they are.
    """
    env = dict(image_env)
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(get(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
        else:
            raise AssertionError(f"envFrom {src}: secrets must be referenced key by key (secretKeyRef)")
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = f"secret:{ref['name']}/{ref['key']}"
    return env


# ---------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    line: int
    cmd: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined
    heredocs: list[str] = field(default_factory=list)  # bodies of <<EOF ... EOF


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction]


@dataclass
class Dockerfile:
    global_args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        (s,) = [s for s in self.stages if s.name == name]
        return s


_HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions of a Dockerfile: comments dropped, continuations joined, heredocs collected."""
    lines = text.splitlines()
    instructions: list[Instruction] = []
    i = 0
    while i < len(lines):
        start, line = i, lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1]
            nxt = lines[i]
            i += 1
            if not nxt.lstrip().startswith("#"):
                line += " " + nxt.strip()
        cmd, _, args = line.strip().partition(" ")
        heredocs = []
        for delim in _HEREDOC.findall(args):
            body = []
            while lines[i] != delim:
                body.append(lines[i])
                i += 1
            i += 1
            heredocs.append("\n".join(body) + "\n")
        instructions.append(Instruction(start + 1, cmd.upper(), args.strip(), heredocs))

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, words[0], []))
        elif not stages:
            assert ins.cmd == "ARG", f"line {ins.line}: only ARG may precede FROM"
            key, _, default = ins.args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(ins)
    return Dockerfile(global_args, stages)


@functools.cache
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def substitute(text: str, values: dict[str, str]) -> str:
    """Docker's `$VAR` / `${VAR}` substitution in ENV/ARG/COPY/WORKDIR (unknown -> empty)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], ""), text)


def env_pairs(args: str, values: dict[str, str]) -> dict[str, str]:
    """`ENV A=1 B="two words"` -> {"A": "1", "B": "two words"}, with substitution."""
    out = {}
    for word in shlex.split(args):
        key, eq, value = word.partition("=")
        assert eq, f"ENV {args!r}: use the KEY=VALUE form"
        out[key] = substitute(value, {**values, **out})
    return out


def image_env(stage_name: str = "runtime") -> dict[str, str]:
    """The ENV a container of the final image starts with (PATH left as the image sets it)."""
    env: dict[str, str] = {}
    for ins in dockerfile().stage(stage_name).instructions:
        if ins.cmd == "ENV":
            env.update(env_pairs(ins.args, env))
    return env
