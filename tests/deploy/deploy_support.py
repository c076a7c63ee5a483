"""What the deploy tests share: rendered overlays, the parsed Dockerfile, a pod's environment.

Nothing here asserts; the test files do. Overlays are rendered with the real
`kubectl kustomize` (kustomize v5), exactly what `kubectl apply -k` sends.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DASHBOARD = K8S / "base" / "grafana" / "rlhf-loop.json"  # also the ConfigMap rlhf-grafana-dashboard
OVERLAYS = tuple(sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists()))
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# Strimzi's CRDs live beside the clone (CI puts them there), never inside the project.
STRIMZI_CRDS = ROOT.parent / "shared" / "strimzi-crds"
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


def rlhf_containers(objs) -> list[tuple[dict, dict]]:
    """(workload, container) for every container that runs the project's image (`rlhf <cmd>`)."""
    out = []
    for w in objs:
        if w["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}:
            for c in containers(w):
                if c["image"].rsplit(":", 1)[0].rsplit("/", 1)[-1] == IMAGE:
                    out.append((w, c))
    return out


def the_container(objs, deployment: str) -> tuple[dict, dict]:
    w = get(objs, "Deployment", deployment)
    (c,) = containers(w)
    return w, c


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
