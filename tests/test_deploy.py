import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from dinodist.core.errors import DinodistError
from dinodist.orchestrator.allocate import make_plan
from dinodist.orchestrator.cli import main
from dinodist.orchestrator.launchfiles import LaunchSpec, k8s_manifests, sbatch_script, torchrun_scripts
from dinodist.orchestrator.topology import load_topology

# cpu-demo.yaml names the teacher the README command makes first; tests run without it.
NO_TEACHER = {"teacher.checkpoint": None}


ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "topologies" / "dinov3-paper.yaml"
DEMO = ROOT / "configs" / "topologies" / "cpu-demo.yaml"


def spec_for(path, **overrides):
    if path == DEMO:
        overrides = {**NO_TEACHER, **overrides}
    topo = load_topology(path, overrides or None)
    return LaunchSpec(topo, make_plan(topo), str(path), path.read_text())


@pytest.mark.multiproc
def test_torchrun_scripts_cover_every_rank(tmp_path):
    spec = spec_for(PAPER)
    scripts = torchrun_scripts(spec)
    assert len(scripts) == spec.plan.nodes
    total = 0
    for name, text in scripts.items():
        f = tmp_path / name
        f.write_text(text)
        subprocess.run(["bash", "-n", str(f)], check=True)
        (nproc,) = re.findall(r"--nproc-per-node=(\d+)", text)
        total += int(nproc)
        assert f"--nnodes={spec.plan.nodes}" in text and "--rdzv-backend=c10d" in text
        assert "--max-restarts=3" in text and "-m dinodist.orchestrator.runtime.rank" in text
        assert f"--plan {spec.plan_path}" in text
    assert total == spec.plan.used_devices


def _stubs(bin_dir: Path, hosts: list[str]) -> None:
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf '%s\\n' " + " ".join(hosts) + "\n")
    # srun: one task per node, as SLURM would start them (sequentially here)
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        f"for i in $(seq 0 {len(hosts) - 1}); do SLURM_NODEID=$i \"$@\"; done\n")
    (bin_dir / "torchrun").write_text("#!/bin/bash\necho \"node=$SLURM_NODEID $*\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)


@pytest.mark.multiproc
def test_sbatch_runs_one_torchrun_per_node(tmp_path):
    # 5 ranks on nodes of 2: the last node runs a single rank
    spec = spec_for(DEMO, **{"cluster.devices_per_node": 2, "cluster.nodes": 3,
                             "control.secret_env": "S"})
    text = sbatch_script(spec)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert re.search(r"^#SBATCH --nodes=3$", text, re.M)
    assert re.search(r"^#SBATCH --cpus-per-task=2$", text, re.M)
    hosts = ["h0", "h1", "h2"]
    _stubs(tmp_path / "bin", hosts)
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    env = dict(os.environ, PATH=path, SLURM_JOB_NODELIST="h[0-2]", S="x")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30,
                         check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    counts = [int(re.search(r"--nproc-per-node=(\d+)", line).group(1)) for line in lines]
    assert counts == [2, 2, 1] and sum(counts) == spec.plan.used_devices
    assert all("--rdzv-endpoint=h0:29400" in line for line in lines)


@pytest.mark.multiproc
def test_sbatch_requires_the_secret(tmp_path):
    spec = spec_for(DEMO, **{"control.secret_env": "DINODIST_TEST_SECRET_UNSET"})
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(spec))
    _stubs(tmp_path / "bin", ["h0"])
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    env.pop("DINODIST_TEST_SECRET_UNSET", None)
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "DINODIST_TEST_SECRET_UNSET" in proc.stderr


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_k8s_manifests_load_and_count_ranks(kind):
    spec = spec_for(PAPER)
    docs = list(yaml.safe_load_all(k8s_manifests(spec, kind)))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["ConfigMap", "Service", "TrainJob" if kind == "trainjob" else "PyTorchJob"]
    config, service, job = docs
    assert yaml.safe_load(config["data"]["topology.yaml"]) == yaml.safe_load(PAPER.read_text())
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert {p["port"] for p in service["spec"]["ports"]} >= {5555, 9400}
    if kind == "trainjob":
        t = job["spec"]["trainer"]
        ranks = t["numNodes"] * t["numProcPerNode"]
        assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == t["numProcPerNode"]
        env = {e["name"]: e for e in t["env"]}
    else:
        specs = job["spec"]["pytorchReplicaSpecs"]
        pods = specs["Master"]["replicas"] + specs.get("Worker", {}).get("replicas", 0)
        ranks = pods * int(job["spec"]["nprocPerNode"])
        env = {e["name"]: e for e in specs["Master"]["template"]["spec"]["containers"][0]["env"]}
    assert ranks == spec.plan.used_devices
    assert env["DINODIST_CONTROL_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "secret"
    assert env["DINODIST_CONTROL"]["value"].startswith(f"tcp://{service['metadata']['name']}:")


def test_k8s_refuses_partial_nodes():
    spec = spec_for(DEMO, **{"cluster.devices_per_node": 2, "cluster.nodes": 3, "control.secret_env": "S"})
    with pytest.raises(DinodistError, match="deploy k8s: the plan uses 5 devices, not whole nodes of 2"):
        k8s_manifests(spec)


def paper_without_checkpointing(tmp_path: Path) -> Path:
    """The paper topology with activation checkpointing off: what this version's runtime can run."""
    raw = yaml.safe_load(PAPER.read_text())
    for s in raw["students"]:
        s["activation_checkpointing"] = False
    path = tmp_path / "paper-no-ac.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_deploy_cli_writes_files(tmp_path, capsys):
    # planned with activation checkpointing, which the runtime does not apply yet: refused, one line
    assert main(["deploy", "k8s", str(PAPER), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dinodist deploy: error: students[0].activation_checkpointing: not applied by the runtime "
                   "yet (the plan's memory assumes it); set it to false to run"]
    assert not (tmp_path / "refused").exists()
    paper = paper_without_checkpointing(tmp_path)
    assert main(["deploy", "k8s", str(paper), "--out", str(tmp_path / "k"), "--k8s-kind", "pytorchjob",
                 "--image", "reg/dinodist:1"]) == 0
    plan_path, path = capsys.readouterr().out.split()
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    assert docs[2]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"] \
        == "reg/dinodist:1"
    # the ranks read the plan deploy made, from the ConfigMap
    assert json.loads(docs[0]["data"]["plan.json"]) == json.loads(Path(plan_path).read_text())
    command = docs[2]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[-3:] == ["/etc/dinodist/topology.yaml", "--plan", "/etc/dinodist/plan.json"]
    assert main(["deploy", "torchrun", str(DEMO), "--out", str(tmp_path / "t")]) == 0
    assert [Path(p).name for p in capsys.readouterr().out.split()] == ["plan.json", "node-0.sh"]
    script = (tmp_path / "t" / "node-0.sh").read_text()
    assert f"--plan {tmp_path / 't' / 'plan.json'}" in script
    assert main(["deploy", "slurm", str(ROOT / "tests" / "topologies_bad" / "unknown_arch.yaml")]) == 2
    assert "dinodist deploy: error: students[1].arch: unknown arch" in capsys.readouterr().err
