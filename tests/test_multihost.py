"""Two local processes (4 fake CPU devices each, gloo collectives, `jax.distributed`) train the
same run as one process with 8 devices: same losses, each process reading only its rows, and a
multi-process orbax checkpoint. This file is also the worker script (`python <file> worker ...`).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETS = ["model.vocab_size=64", "model.hidden_size=16", "model.head_dim=4", "model.gqa_ratio=1",
        "model.num_layers=2", "train.seq_len=16", "train.global_batch=16", "train.micro_batch=8",
        "train.steps=3", "train.checkpoint_every=2", "train.async_checkpoint=false",
        "train.log_every=1", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _train(run_dir):
  from atma_jax.config import resolve
  from atma_jax.train.loop import run
  from test_train_standin import ToyData, standin_losses, standin_model_fn
  cfg = resolve("tiny", SETS + [f"train.run_dir={run_dir}"])
  return run(cfg, model_fn=standin_model_fn(cfg), losses_fn=standin_losses,
             data_fn=lambda c, i, n: ToyData(c, i, n), eval_data_fn=None, progress=False,
             log=lambda *_: None)


def _worker(pid, port, run_dir, out):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  summary = _train(run_dir)
  with open(out, "w") as f:
    json.dump({"losses": summary["train_losses"], "steps": summary["steps"]}, f)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, HERE]))
  procs = [subprocess.Popen([sys.executable, __file__, "worker", str(i), str(port),
                             str(tmp_path / "multi"), str(tmp_path / f"out{i}.json")],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0].decode()[-3000:] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log
  multi = [json.load(open(tmp_path / f"out{i}.json")) for i in range(2)]
  single = _train(tmp_path / "single")  # this process: 8 devices from conftest
  assert multi[0]["steps"] == multi[1]["steps"] == single["steps"] == 3
  assert multi[0]["losses"] == multi[1]["losses"]
  got = [l for _, l in multi[0]["losses"]]
  want = [l for _, l in single["train_losses"]]
  assert got == pytest.approx(want, rel=1e-5)
  ckpts = sorted(os.listdir(tmp_path / "multi" / "checkpoints"))
  assert ckpts == ["2", "3"]
  data_files = sorted(f for f in os.listdir(tmp_path / "multi" / "checkpoints" / "3" / "data")
                      if f.startswith("process_"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
