"""Callbacks shared by the training tests."""
from mindspore.train.callback import Callback


class StopAt(Callback):
    """Ends training after optimizer step `step`, as an interruption would (the checkpoint callback still saves)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_step_end(self, run_context):
        if run_context.original_args().cur_step_num == self.step:
            run_context.request_stop()
