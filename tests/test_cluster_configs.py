"""The cluster configs in cluster/ and the commands in docs/cluster.md, checked without a cloud:

- cluster/aws.yaml validates against the schema the installed Ray ships (and Ray's own
  launcher checks after filling in its AWS defaults); CPU head, 8-GPU and 1-GPU worker
  types with min/max workers, instance profiles for S3, every node in the image of
  cluster/Dockerfile (its `docker:` block) with a set-up that only re-installs wr-train
  against constraints.txt, token auth on every node;
- NCCL over EFA on the 8-GPU types: the instance's EFA interfaces, a placement group, the
  EFA devices and the libfabric/NCCL environment (aws.yaml and the KubeRay manifests);
- the KubeRay manifests parse and carry the fields KubeRay requires;
- cluster/runtime_env.yaml is a valid Ray runtime_env that installs nothing;
- one set of pins: constraints.txt pins every package the suite runs with (the versions
  installed here), and the Makefile, the Dockerfile and aws.yaml install with it; the image's
  Ray tag names the CUDA of the torch index it installs from;
- no file in cluster/ holds AWS keys or a fixed AWS region (wr-train asks each bucket);
- every entrypoint named in the manifests and the docs exists, `--help` works, and the
  flags given to it are accepted by its argparse (and, for pretraining, by the config
  loader and its validation), without running anything.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCS = REPO / "docs" / "cluster.md"
ENTRYPOINTS = ("ray_jobs/pretrain.py", "ray_jobs/tune_clue.py")


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_version() -> str:
    import ray
    return ray.__version__


# ------------------------------------------------------------------ AWS launcher

def test_aws_yaml_validates_against_the_installed_ray_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("aws.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(config)  # merged with Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_node_types_and_set_up():
    config = load("aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert not head["node_config"]["InstanceType"].startswith(("p", "g"))  # a CPU instance
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpus = sorted(t["resources"]["GPU"] for t in workers.values())
    assert gpus == [1, 8], gpus
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    # S3 through instance profiles, on every node type
    for name, t in types.items():
        assert t["node_config"]["IamInstanceProfile"]["Name"].startswith("wr-train-"), name
    # every node runs the image the KubeRay manifests run; a scale-up installs nothing big:
    # the set-up re-installs the synced checkout held to the pins, nothing else
    assert config["docker"]["image"] == kuberay_image()
    assert config["setup_commands"] == ["pip install -q -c ~/wr-train/constraints.txt -e ~/wr-train"]
    assert "torch" not in json.dumps(config).replace("wr-train", "")
    assert config["file_mounts"]["~/wr-train"] == "."
    assert "~/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key


def test_no_credentials_or_fixed_region_in_cluster_files():
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY|"
                         r"AWS_ACCESS_KEY_ID|aws_access_key_id", re.I)
    for path in [*CLUSTER.rglob("*"), DOCS]:
        if path.is_file():
            assert not pattern.search(path.read_text()), path
    # a region set on the nodes would win over each bucket's own (wr_train.s3)
    for path in CLUSTER.rglob("*.yaml"):
        assert not re.search(r"name: AWS_(DEFAULT_)?REGION|AWS_(DEFAULT_)?REGION[=:]", path.read_text()), path


def efa_interfaces(instance_type: str) -> int:
    """EFA interfaces (network cards) of the 8-GPU instance types."""
    return {"p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32, "p5e.48xlarge": 32,
            "p5en.48xlarge": 16}[instance_type]


def test_aws_efa_on_the_multi_node_gpu_type():
    config = load("aws.yaml")
    types = config["available_node_types"]
    (gpu8,) = [t for t in types.values() if t["resources"].get("GPU") == 8]
    node = gpu8["node_config"]
    nics = node["NetworkInterfaces"]
    assert len(nics) == efa_interfaces(node["InstanceType"])
    assert [n["NetworkCardIndex"] for n in nics] == list(range(len(nics)))
    assert all(n["InterfaceType"] == "efa" for n in nics)
    assert [n["DeviceIndex"] for n in nics] == [0] + [1] * (len(nics) - 1)
    assert node["Placement"]["GroupName"]
    # one security group for every node: Ray's ports and EFA traffic within the group
    groups = {g for n in nics for g in n["Groups"]}
    assert len(groups) == 1 and len({n["SubnetId"] for n in nics}) == 1
    for name, t in types.items():
        if t is not gpu8:
            assert t["node_config"]["SecurityGroupIds"] == list(groups), name
            assert "NetworkInterfaces" not in t["node_config"] and "docker" not in t, name
    run = " ".join(gpu8["docker"]["worker_run_options"])
    for needle in ("--device=/dev/infiniband", "--cap-add=IPC_LOCK", "memlock=-1",
                   "FI_PROVIDER=efa", "FI_EFA_USE_DEVICE_RDMA=1", "NCCL_DEBUG="):
        assert needle in run, needle
    # Ray's launcher accepts the interfaces (subnets and groups given per interface)
    from ray.autoscaler._private.aws.config import _configure_node_type_from_network_interface
    done = _configure_node_type_from_network_interface(gpu8)
    assert set(done["node_config"]["SecurityGroupIds"]) == groups


# ------------------------------------------------------------------ KubeRay

def kube_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray_version(), where
    assert spec["authOptions"]["mode"] == "token", where
    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams", {}), dict), where
    containers = head["template"]["spec"]["containers"]
    assert containers and containers[0]["image"] and containers[0]["name"], where
    assert "nvidia.com/gpu" not in containers[0].get("resources", {}).get("limits", {}), where
    groups = spec["workerGroupSpecs"]
    assert groups, where
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), where
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (where, g["groupName"])
        assert isinstance(g.get("rayStartParams", {}), dict)
        c = g["template"]["spec"]["containers"][0]
        assert c["image"] and c["name"]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, (where, g["groupName"])
    for pod in [head["template"], *(g["template"] for g in groups)]:
        assert pod["spec"]["serviceAccountName"] == "wr-train", where  # S3 via the pod's IAM role


def kuberay_image() -> str:
    images = {image for name in ("raycluster.yaml", "rayjob.yaml") for d in kube_docs(name)
              for image in re.findall(r"'image': '([^']+)'", str(d))}
    assert len(images) == 1, images
    return images.pop()


def gpu8_groups():
    rc = [d for d in kube_docs("raycluster.yaml") if d["kind"] == "RayCluster"][0]["spec"]
    job = kube_docs("rayjob.yaml")[0]["spec"]["rayClusterSpec"]
    return [g for spec in (rc, job) for g in spec["workerGroupSpecs"]
            if g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"]


def test_kuberay_efa_on_the_multi_node_gpu_groups():
    groups = gpu8_groups()
    assert len(groups) == 2
    for g in groups:
        c = g["template"]["spec"]["containers"][0]
        res = c["resources"]
        assert res["requests"]["vpc.amazonaws.com/efa"] == res["limits"]["vpc.amazonaws.com/efa"]
        assert int(res["limits"]["vpc.amazonaws.com/efa"]) in (4, 16, 32)
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1" and "NCCL_DEBUG" in env
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]


def test_raycluster_manifest():
    docs = kube_docs("raycluster.yaml")
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(clusters) == 1 and clusters[0]["apiVersion"] == "ray.io/v1"
    rc = clusters[0]
    assert rc["metadata"]["name"]
    check_ray_cluster_spec(rc["spec"], "RayCluster")
    gpus = sorted(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                  for g in rc["spec"]["workerGroupSpecs"])
    assert gpus == [1, 8]
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    sa = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert sa and sa[0]["metadata"]["name"] == "wr-train"


def test_rayjob_manifest_runs_pretraining():
    (job,) = kube_docs("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert "ray_jobs/pretrain.py" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob")


def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv
    env = load("runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert env["working_dir"] == "."
    assert ".venv" in env["excludes"]
    assert "DS_ACCELERATOR" not in env.get("env_vars", {})  # would clash with wr-train's own
    # the job runs on the nodes' pinned stack: nothing installed per job
    assert not {"pip", "uv", "conda", "py_executable"} & set(env)
    # docs/cluster.md's NCCL check appends a variable to the file: it lands in env_vars
    text = (CLUSTER / "runtime_env.yaml").read_text()
    assert "echo '  NCCL_DEBUG: INFO' >> /tmp/runtime_env_nccl.yaml" in DOCS.read_text()
    nccl = yaml.safe_load(text + "  NCCL_DEBUG: INFO\n")
    RuntimeEnv(**nccl)
    assert nccl["env_vars"] == {**env["env_vars"], "NCCL_DEBUG": "INFO"}


# ------------------------------------------------------------------ one set of pins

def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and "+" not in version, line  # one exact, build-free pin
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_what_the_suite_runs_with():
    """Every installed package at its pinned version (`make install` installs with the
    pins; after a dependency change `make constraints` rewrites them), and every package
    wr-train and its test extra name is pinned."""
    from importlib import metadata
    import site
    import tomllib
    pins = constraints()
    # site-packages only: once setuptools is imported its _vendor folder is on sys.path,
    # and its vendored copies (older zipp, packaging, ...) are not what pip installed
    installed = {canonical(d.metadata["Name"]): d.version
                 for d in metadata.distributions(path=site.getsitepackages())}
    wrong = {n: (v, installed[n]) for n, v in pins.items()
             if n in installed and installed[n].split("+")[0] != v}
    assert not wrong, f"installed versions differ from constraints.txt (run `make constraints`): {wrong}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for req in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        name = canonical(re.match(r"[A-Za-z0-9_.-]+", req).group())
        assert name in pins, f"{req}: not in constraints.txt (run `make constraints`)"
    assert pins["ray"] == ray_version()


def test_every_install_reads_the_constraints():
    make = (REPO / "Makefile").read_text()
    installs = [line for line in make.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert len(installs) == 2 and all("-c $(CONSTRAINTS)" in line for line in installs), installs
    assert "CONSTRAINTS := constraints.txt" in make
    docker = (CLUSTER / "Dockerfile").read_text()
    assert "COPY --chown=ray:users constraints.txt" in docker
    runs = re.findall(r"pip install[^\n]*", docker)
    assert len(runs) == 2 and all("-c constraints.txt" in r for r in runs), runs
    assert "pip install -q -c ~/wr-train/constraints.txt" in load("aws.yaml")["setup_commands"][0]


def test_image_is_rays_cuda_tag_matching_torchs_index():
    docker = (CLUSTER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", docker, re.M))
    assert args["RAY_VERSION"] == ray_version() == constraints()["ray"]
    cuda = args["CUDA"]
    assert re.fullmatch(r"cu\d{3}", cuda)
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA}" in docker  # Python 3.11, as tested
    assert 'download.pytorch.org/whl/${CUDA}' in docker and '+${CUDA}"' in docker
    assert sys.version_info[:2] == (3, 11)


# ------------------------------------------------------------------ entrypoints and their flags

def _load_script(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem + "_entry", REPO / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit as e:  # argparse printed why on stderr
        raise AssertionError(f"{parser.prog} {' '.join(argv)}: rejected by argparse") from e


def check_pretrain_flags(argv: list[str]) -> None:
    from wr_train.cli import add_pretrain_args, pretrain_config
    parser = argparse.ArgumentParser(prog="ray_jobs/pretrain.py")  # as the script builds it
    add_pretrain_args(parser)
    args = parse(parser, argv)
    cfg = pretrain_config(args)  # recipe + flags + key=value overrides, validated
    assert all(st.shards for st in cfg.stages)


def check_tune_flags(argv: list[str]) -> None:
    from wr_train.tune_trials import build_grid, parse_list
    args = parse(_load_script("ray_jobs/tune_clue.py").parser(), argv)
    build_grid(["t"], parse_list(args.epochs, int, "--epochs"),
               parse_list(args.batch_sizes, int, "--batch-sizes"),
               parse_list(args.lrs, float, "--lrs"), args.seeds)


def check_wr_train_flags(argv: list[str]) -> None:
    from wr_train.cli import _parser
    parse(_parser(), argv)


CHECKS = {"ray_jobs/pretrain.py": check_pretrain_flags, "ray_jobs/tune_clue.py": check_tune_flags}


def commands_in(text: str) -> list[list[str]]:
    """Each shell command (continuation lines joined, `&&` chains split) as tokens; for
    `ray job submit … -- ENTRYPOINT` the entrypoint, unpacked from a `bash -c '…'`."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        if "--" in tokens and tokens[:3] == ["ray", "job", "submit"]:
            tokens = tokens[tokens.index("--") + 1:]
            if tokens[:2] in (["bash", "-c"], ["sh", "-c"]):
                tokens = shlex.split(tokens[2])
        cmd: list[str] = []
        for t in tokens + ["&&"]:
            if t in ("&&", ";", "||", "|"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(t)
    return out


def entrypoint_calls(text: str) -> list[tuple[str, list[str]]]:
    calls = []
    for cmd in commands_in(text):
        for i, tok in enumerate(cmd):
            hit = next((e for e in ENTRYPOINTS if tok.endswith(e)), None)
            if hit and i > 0 and Path(cmd[i - 1]).name.startswith("python"):
                calls.append((hit, cmd[i + 1:]))
    return calls


def doc_blocks() -> str:
    return "\n".join(re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S))


def all_calls() -> list[tuple[str, str, list[str]]]:
    calls = []
    job = kube_docs("rayjob.yaml")[0]
    calls += [("rayjob.yaml", e, a) for e, a in entrypoint_calls(job["spec"]["entrypoint"])]
    for name in ("kuberay/raycluster.yaml", "runtime_env.yaml", "aws.yaml"):
        comments = "\n".join(line.lstrip("# ") for line in (CLUSTER / name).read_text().splitlines()
                             if line.lstrip().startswith("#"))
        calls += [(name, e, a) for e, a in entrypoint_calls(comments)]
    calls += [("docs/cluster.md", e, a) for e, a in entrypoint_calls(doc_blocks())]
    return calls


def test_entrypoints_exist_and_help_works():
    named = {e for _, e, _ in all_calls()}
    assert named == set(ENTRYPOINTS), named
    for rel in sorted(named):
        assert (REPO / rel).is_file(), rel
        proc = subprocess.run([sys.executable, rel, "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (rel, proc.stderr[-2000:])


@pytest.mark.parametrize("where,entry,argv", [
    pytest.param(w, e, a, id=f"{w}:{Path(e).name}:{i}") for i, (w, e, a) in enumerate(all_calls())])
def test_entrypoint_flags_are_accepted(where, entry, argv):
    CHECKS[entry](argv)


def test_wr_train_commands_in_the_docs_parse():
    cmds = [c[1:] for c in commands_in(doc_blocks()) if c and c[0] == "wr-train"]
    assert {c[0] for c in cmds} >= {"pull", "export", "fill-mask", "preprocess"}, cmds
    for argv in cmds:
        check_wr_train_flags(argv)


def test_docs_cover_the_whole_path():
    text = DOCS.read_text()
    assert text.startswith("## Running on a cluster")
    for needle in ("ray up", "ray dashboard", "kubectl apply -f cluster/kuberay/raycluster.yaml",
                   "ray job submit", "ray job logs -f", "ray_jobs/tune_clue.py", "wr-train pull",
                   "wr-train export", "wr-train fill-mask", "RAY_AUTH_MODE=token", "ray down"):
        assert needle in text, needle
    for path in re.findall(r"`(cluster/[\w./-]+)`", text):
        assert (REPO / path).exists(), path


def test_readme_and_makefile_agree_on_torch():
    """A fresh Linux machine gets the CPU build from `make install` (PyTorch's CPU index),
    as the README says; the README's GPU command names the image's CUDA."""
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^TORCH_INDEX \?= https://download\.pytorch\.org/whl/cpu$", make, re.M)
    assert "TORCH_SPEC ?= torch==$(TORCH_VERSION) --no-deps --extra-index-url $(TORCH_INDEX)" in make
    readme = (REPO / "README.md").read_text()
    assert f"installs torch {constraints()['torch']}'s CPU build first (from PyTorch's" in readme
    cuda = dict(re.findall(r"^ARG (\w+)=(\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M))["CUDA"]
    assert f"make TORCH_INDEX=https://download.pytorch.org/whl/{cuda} install" in readme
    assert f"torch=={constraints()['torch']}+{cuda} --extra-index-url https://download.pytorch.org/whl/{cuda}" in readme
