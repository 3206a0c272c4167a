"""What a training run reports, on process 0 only: TensorBoard scalars, a progress bar or log lines.

The scalars go to `<workdir>/tensorboard` through TensorFlow's summary API; the bar is tqdm's,
with loss components, lr and images/s; without the bar (`train.progress_bar = False`) the same
text is logged with the ETA. Images/s is measured over the steps dispatched since the last
report. Why not clu's metric writers and periodic actions: docs/architecture.md#reporting.
"""

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def format_metrics(metrics: dict[str, float], images_per_s: float) -> str:
    """'loss 1.2345 (cls ... box ... ctr ...) pos 12 lr 1.00e-02 34.5 img/s'."""
    return (
        f"loss {metrics['loss']:.4f} (cls {metrics['loss_cls']:.4f} "
        f"box {metrics['loss_bbox']:.4f} ctr {metrics['loss_centerness']:.4f}) "
        f"pos {metrics['num_pos']:.0f} lr {metrics['lr']:.2e} {images_per_s:.1f} img/s"
    )


class TrainLog:
    """The reports of one run from `start_step` to `num_steps` (module docstring)."""

    def __init__(
        self,
        workdir: Path,
        num_steps: int,
        start_step: int,
        batch_size: int,
        lead: bool,
        progress_bar: bool,
    ) -> None:
        self.num_steps, self.batch_size, self.lead = num_steps, batch_size, lead
        self._writer = self._bar = None
        if lead:
            import tensorflow as tf  # the metric writer is TF's summary API

            self._tf = tf
            self._writer = tf.summary.create_file_writer(str(workdir / "tensorboard"))
        if lead and progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._window_start, self._window_images = time.perf_counter(), 0

    def dispatched(self) -> None:
        """Counts one more global batch towards images/s."""
        self._window_images += self.batch_size

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """Reports the metrics of `step`; starts a new images/s window."""
        elapsed = time.perf_counter() - self._window_start
        rate = self._window_images / max(elapsed, 1e-9)
        text = format_metrics(metrics, rate)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=True)
        self.scalars(step, dict(metrics, images_per_second=rate))
        if self.lead and self._bar is None:
            eta = (self.num_steps - step) * elapsed / max(self._window_images, 1) * self.batch_size
            log.info("step %d/%d %s eta %.0fs", step, self.num_steps, text, eta)
        self._window_start, self._window_images = time.perf_counter(), 0

    def evaluation(self, step: int, stats: dict[str, float], report: str) -> None:
        """Prints an evaluation's report and writes its stats as `eval/<name>` scalars."""
        if self.lead:
            print(f"evaluation at step {step}:\n{report}", flush=True)
            self.scalars(step, {f"eval/{k}": v for k, v in stats.items()})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Writes TensorBoard scalars at `step` and flushes them."""
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for name, value in values.items():
                self._tf.summary.scalar(name, value)
        self._writer.flush()

    def close_progress(self) -> None:
        """Closes the progress bar (the scalars stay writable, for the final evaluation)."""
        if self._bar is not None:
            self._bar.close()
