"""metrics.png: labelled axes, the KL on its own axis, the run's settings in the title, and
coinciding curves that stay distinguishable."""

import pytest

from m1jax.train import metrics, rl, schema, sft


def _rl_records():
  records = []
  for step in range(12):
    records.append({"step": step, "reward": 0.1 * step, "response_length": 20.0 - step,
                    "clip_frac_high": 0.01, "clip_frac_low": 0.0, "is_weight_mean": 1.0,
                    "is_weight_max": 3.0, "grad_norm": 2.0, "entropy_mean": 0.5,
                    "approx_kl_k3": 1e-4 * step})
    if step % 5 == 0:  # the byte-task reward is the accuracy: the two curves coincide
      records[-1].update({"eval/reward": 0.05 * step, "eval/accuracy": 0.05 * step})
  return records


def _lines(fig):
  return {line.get_label(): (ax, line) for ax in fig.axes for line in ax.get_lines()}


def test_rl_figure_axes_titles_and_curves():
  config = schema.base_config()
  config.rl.loss.kind = "cispo"
  fig = metrics.figure(_rl_records(), rl.PANELS, metrics.plot_title(config, "rl"))
  assert all(ax.get_ylabel() for ax in fig.axes)  # every y axis (twins included) is labelled
  lines = _lines(fig)
  kl_axis, _ = lines["approx_kl_k3"]
  assert [line.get_label() for line in kl_axis.get_lines()] == ["approx_kl_k3"]
  assert lines["grad_norm"][0] is not kl_axis
  # eval/reward and eval/accuracy are equal here: the label says so and the styles differ.
  (_, reward), (_, accuracy) = lines["eval/reward"], lines["eval/accuracy (= eval/reward)"]
  assert (reward.get_linestyle(), reward.get_marker()) != (accuracy.get_linestyle(),
                                                           accuracy.get_marker())
  assert reward.get_color() != accuracy.get_color()
  title = fig._suptitle.get_text()
  assert "rl on arithmetic: cispo (is_ratio_cap=5)" in title
  assert "16 prompts x 8 samples, 1 updates/batch" in title and "lr 0.001" in title
  assert "seed 0" in title


def test_sft_figure_and_png(tmp_path):
  config = schema.base_config()
  records = [{"step": s, "nll": 2.0 / (s + 1), "grad_norm": 1.0} for s in range(5)]
  records[-1].update({"eval/reward": 0.2, "eval/accuracy": 0.1})
  fig = metrics.figure(records, sft.PANELS, metrics.plot_title(config, "sft"))
  assert [ax.get_ylabel() for ax in fig.axes] == [
      "NLL (nats / demonstration token)", "accuracy / reward", "global norm before clipping"]
  assert "sft on arithmetic: batch 64, 200 steps, lr 0.003" in fig._suptitle.get_text()
  metrics.plot_metrics(records, sft.PANELS, str(tmp_path / "m.png"), title="t")
  assert (tmp_path / "m.png").stat().st_size > 1000


def test_torn_last_line_is_dropped_and_repaired_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert metrics.read_jsonl(str(path)) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
  writer = metrics.MetricsWriter(str(tmp_path), resume_step=2, tensorboard=False)
  writer.write(3, {"loss": 1.0})
  assert path.read_text().splitlines()[-2:] == ['{"step": 2, "loss": 1.5}',
                                                '{"step": 3, "loss": 1.0}']
  # A bad line that is not the torn end of the file is an error naming it.
  path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
  with pytest.raises(ValueError, match=f"{path}:2: not a metrics record"):
    metrics.read_jsonl(str(path))
