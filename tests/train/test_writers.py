"""metrics.jsonl survives a kill in the middle of a line and is replayed cleanly on resume."""

import json
import subprocess
import sys
import textwrap

from medjax.train.writers import MetricWriter, read_jsonl


def test_resume_drops_a_half_written_line_and_the_steps_after_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)]
  path.write_text("".join(lines) + '{"step": 5, "train/lo')  # killed mid-write
  assert [r["step"] for r in read_jsonl(str(path))] == [1, 2, 3, 4]
  writer = MetricWriter(str(tmp_path), resume_step=3)
  writer.write(4, {"train/loss": 0.5})
  writer.close()
  records = read_jsonl(str(path))
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert records[-1]["train/loss"] == 0.5


def test_tensorboard_events_are_written_without_importing_pytorch(tmp_path):
  """tensorboardX imports PyTorch when it is installed; the writer keeps it out (seconds of every
  run's start) and the events still read back. PyTorch stays importable afterwards."""
  code = textwrap.dedent(f"""
      import importlib.util, os, struct, sys
      from medjax.train.writers import MetricWriter
      writer = MetricWriter({str(tmp_path)!r})
      writer.write(3, {{"val/auc": 0.75}})
      writer.close()
      assert "torch" not in sys.modules, "torch imported"
      from tensorboardX.proto import event_pb2
      folder = os.path.join({str(tmp_path)!r}, "tensorboard")
      (name,) = os.listdir(folder)
      data, values = open(os.path.join(folder, name), "rb").read(), []
      while data:  # TFRecord: length, its CRC, the record, its CRC
        (n,) = struct.unpack("<Q", data[:8])
        event = event_pb2.Event.FromString(data[12:12 + n])
        values += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        data = data[16 + n:]
      print(values)
      if importlib.util.find_spec("torch"):
        import torch
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[(3, 'val/auc', 0.75)]"
