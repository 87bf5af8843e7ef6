"""One device in the engine's own process: today's path, with nothing in between."""

from __future__ import annotations

from rtpllm.engine.executor.base import Executor
from rtpllm.engine.executor.worker import Worker, WorkerSpec
from rtpllm.loader import LoadedModel


class UniProcExecutor(Executor):
    def __init__(self, spec: WorkerSpec):
        self.worker = Worker(spec)

    def load_model(self) -> LoadedModel:
        return self.worker.load_model()

    def init_runner(self, max_model_len: int, extra_kv_bytes_per_block: int = 0, kv_root_hash: int = 0) -> None:
        self.worker.init_runner(max_model_len, extra_kv_bytes_per_block)
        self.runner = self.worker.runner
        # The engine calls the runner's own bound method: not even a forwarding call per step.
        self.execute = self.runner.execute

    def execute(self, batch, sampling_batch, prompt_logprob_seqs, pending=None):  # replaced in init_runner
        raise RuntimeError("executor: init_runner() was not called")

    def shutdown(self) -> None:
        pass
