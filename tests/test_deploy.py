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
        assert f"--plan {spec.plan_path} --resume" in text  # a torchrun restart resumes
    assert total == spec.plan.used_devices


def _stubs(bin_dir: Path, hosts: list[str]) -> None:
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf '%s\\n' " + " ".join(hosts) + "\n")
    # srun: one task per node, as SLURM would start them (sequentially here)
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        f"for i in $(seq 0 {len(hosts) - 1}); do SLURM_NODEID=$i \"$@\"; done\n")
    (bin_dir / "torchrun").write_text("#!/bin/bash\necho \"node=$SLURM_NODEID $*\"\n")
    # the batch shell runs the supervisor on node 0; here it only has to be there
    (bin_dir / "dinodist").write_text("#!/bin/bash\nexit 0\n")
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
    assert kinds == ["ConfigMap", "Service", "Job", "TrainJob" if kind == "trainjob" else "PyTorchJob"]
    config, service, supervisor, job = docs
    # the control Service fronts the supervisor, which serves the control plane and /metrics
    pod = supervisor["spec"]["template"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    assert pod["spec"]["containers"][0]["command"][:2] == ["dinodist", "supervise"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
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


def test_deploy_cli_writes_files(tmp_path, capsys):
    # the paper topology as shipped (students with activation checkpointing) deploys as is
    paper = PAPER
    assert main(["deploy", "k8s", str(paper), "--out", str(tmp_path / "k"), "--k8s-kind", "pytorchjob",
                 "--image", "reg/dinodist:1"]) == 0
    plan_path, path = capsys.readouterr().out.split()
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    assert docs[3]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"] \
        == "reg/dinodist:1"
    # the ranks read the plan deploy made, from the ConfigMap
    assert json.loads(docs[0]["data"]["plan.json"]) == json.loads(Path(plan_path).read_text())
    command = docs[3]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    # every pod restart resumes from the newest common checkpoint instead of starting over
    assert command[-4:] == ["/etc/dinodist/topology.yaml", "--plan", "/etc/dinodist/plan.json", "--resume"]
    assert docs[3]["spec"]["runPolicy"]["backoffLimit"] == 3
    pod = docs[3]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300  # time for one iteration and a checkpoint
    assert main(["deploy", "torchrun", str(DEMO), "--out", str(tmp_path / "t")]) == 0
    assert [Path(p).name for p in capsys.readouterr().out.split()] == ["plan.json", "node-0.sh"]
    script = (tmp_path / "t" / "node-0.sh").read_text()
    assert f"--plan {tmp_path / 't' / 'plan.json'}" in script
    assert main(["deploy", "slurm", str(ROOT / "tests" / "topologies_bad" / "unknown_arch.yaml")]) == 2
    assert "dinodist deploy: error: students[1].arch: unknown arch" in capsys.readouterr().err


@pytest.mark.multiproc
def test_sbatch_preemption_notice_reaches_the_ranks_then_requeues(tmp_path):
    """SLURM's notice (--signal B:USR1) goes to the batch shell: it signals every node's task, which passes
    USR1 to its ranks (not to torchrun), then requeues the job, whose ranks resume."""
    import signal
    import time

    spec = spec_for(DEMO, **{"cluster.devices_per_node": 3, "cluster.nodes": 2, "control.secret_env": "S"})
    text = sbatch_script(spec)
    assert re.search(r"^#SBATCH --requeue$", text, re.M)
    assert re.search(r"^#SBATCH --signal=B:USR1@180$", text, re.M)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": f'#!/bin/bash\nif [ "$1" = requeue ]; then echo "requeue $2" >> {log}; exit 0; fi\n'
                    "printf '%s\\n' h0 h1\n",
        # the tasks run at once, as on two nodes
        "srun": "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
                'for i in 0 1; do SLURM_NODEID=$i "$@" & done; wait\n',
        # scancel --signal=USR1 JOB signals every task of the job's steps: the run_node shells
        "scancel": f'#!/bin/bash\necho "scancel $*" >> {log}\npkill -USR1 -f "^bash -c run_node$"\n',
        "dinodist": "#!/bin/bash\nexit 0\n",  # the supervisor the batch shell starts
        # a rank: waits for USR1, then "checkpoints" and exits 75
        "torchrun": "#!/bin/bash\n"
                    f"bash -c 'trap \"echo rank-usr1 >> {log}; exit 75\" USR1; echo started >> {log}; "
                    "while true; do sleep 0.05; done' &\nwait\n",
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="h[0-1]",
               SLURM_JOB_ID="123", DINODIST_REQUEUE_AFTER_S="0", S="x")
    proc = subprocess.Popen(["bash", str(script)], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not log.exists() or log.read_text().count("started") < 2):
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    calls = log.read_text().splitlines()
    assert calls.count("rank-usr1") == 2, calls  # both nodes' ranks got the notice
    assert "scancel --signal=USR1 123" in calls and "requeue 123" in calls, calls
