"""metrics.jsonl survives a kill in the middle of a line and is replayed cleanly on resume."""

import json

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
