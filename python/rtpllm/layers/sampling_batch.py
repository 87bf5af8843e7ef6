"""The per-step sampling inputs of a batch: one row per sequence that samples this step.

The engine builds a `SamplingBatch` once per step from per-request data it already keeps
(`SamplingParams`, prompt ids, output ids so far, a generator for seeded requests). Everything the
sampler needs to decide *which code paths run* (any top-p row? any penalty? the largest top-k?)
is computed here on the host from Python values, so the sampler itself never reads a device
tensor back (no host syncs on CUDA).

Cost per step: O(n) Python over the rows and one host-to-device copy of the per-row values, plus
O(history) numpy work for the rows that use penalties only (their prompt/output ids become one
index array). Rows without penalties contribute no ids, so the common case never touches token
history; engines with long penalized histories save the list-to-array conversion by passing
numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from rtpllm.sampling_params import SamplingParams

TokenIds = Union[Sequence[int], np.ndarray]


def make_request_generator(seed: int, device: Union[str, torch.device]) -> torch.Generator:
    """The generator of one seeded sequence. Create it once per sequence and pass the same object
    every step: it advances only by that sequence's own draws, so the output does not depend on
    what else is in the batch. (For `n > 1`, give each sample its own seed, e.g. `seed + index`.)"""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


@dataclass(frozen=True)
class SamplingBatch:
    """Device tensors are [n] (one entry per sampled row) unless noted. Build with `build()`."""

    temperature: torch.Tensor  # float32 [n]; 1.0 on greedy rows so dividing is harmless
    greedy: torch.Tensor  # bool [n]: rows that take the argmax
    top_k: torch.Tensor  # int64 [n]; 0 = no top-k on that row
    top_p: torch.Tensor  # float32 [n]; 1.0 = no top-p
    min_p: torch.Tensor  # float32 [n]; 0.0 = no min-p
    repetition_penalty: torch.Tensor  # float32 [n]; 1.0 = none
    presence_penalty: torch.Tensor  # float32 [n]; 0.0 = none
    frequency_penalty: torch.Tensor  # float32 [n]; 0.0 = none
    # Token history of penalized rows as int64 [2, count] (row index; token id) pairs, repeats
    # included. The sampler updates only these logits, so the cost follows the history's length.
    repetition_tokens: Optional[torch.Tensor]  # prompt + output of rows with a repetition penalty
    output_tokens: Optional[torch.Tensor]  # output of rows with a presence or frequency penalty
    # Tokens that must not be sampled now (EOS / stop ids before min_tokens), same layout.
    banned_tokens: Optional[torch.Tensor]
    # Per-row generators of seeded rows (None: the row draws from `default_generator`).
    generators: tuple[Optional[torch.Generator], ...]
    default_generator: Optional[torch.Generator]  # None: torch's global generator of the device
    # Non-greedy rows that draw from their own generator (greedy rows never draw, so a seeded
    # sequence's stream advances only on its random steps).
    seeded_rows: tuple[int, ...]
    num_logprobs: tuple[Optional[int], ...]  # per row, as requested (None: not requested)
    # Host-side summaries that select the sampler's code paths.
    all_greedy: bool
    max_top_k: int  # largest enabled top_k, 0 when no row uses top-k
    use_top_p: bool
    use_min_p: bool
    use_penalties: bool
    max_num_logprobs: Optional[int]  # largest requested `logprobs`; None when no row asked
    # Host copy of the per-row values above (one float32 row per field), so that the next step
    # can tell whether its values are the same and reuse these tensors (see `build(previous=)`).
    row_values: Optional[np.ndarray] = None

    @property
    def num_rows(self) -> int:
        return len(self.generators)

    @classmethod
    def build(cls,
              params_list: Sequence[SamplingParams],
              prompt_ids_list: Sequence[TokenIds],
              output_ids_list: Sequence[TokenIds],
              generators: Sequence[Optional[torch.Generator]],
              device: Union[str, torch.device],
              *,
              default_generator: Optional[torch.Generator] = None,
              banned_token_ids: Optional[Sequence[Optional[TokenIds]]] = None,
              vocab_size: Optional[int] = None,
              previous: Optional["SamplingBatch"] = None) -> "SamplingBatch":
        """One row per sampled sequence, in the order of the logits rows.

        prompt_ids_list / output_ids_list: every row's prompt ids and output ids so far (lists or
            int arrays); read only for rows with a penalty, so they may be empty for other rows.
        generators: a generator per row; required on rows whose params have a seed (see
            `make_request_generator`), must live on `device`.
        default_generator: the engine-wide generator that unseeded rows share.
        banned_token_ids: per row, ids whose logits are set to -inf before anything else (the
            engine passes EOS/stop ids while a row is below `min_tokens`); None or empty = none.
        vocab_size: when given, every id above is checked to be in [0, vocab_size) here, on the
            host, instead of failing inside a device kernel.
        previous: the last step's batch. Where its per-row values (temperature ... top-k, greedy)
            equal this step's, as they do over a steady run of decode steps, its device tensors
            are reused (they are never written) instead of copied and converted again.
        Raises ValueError naming the bad argument.
        """
        device = torch.device(device)
        n = len(params_list)
        if n == 0:
            raise ValueError("params_list: a sampling batch needs at least one row")
        for name, seq in (("prompt_ids_list", prompt_ids_list), ("output_ids_list", output_ids_list),
                          ("generators", generators)):
            if len(seq) != n:
                raise ValueError(f"{name}: has {len(seq)} entries for {n} rows")
        if banned_token_ids is not None and len(banned_token_ids) != n:
            raise ValueError(f"banned_token_ids: has {len(banned_token_ids)} entries for {n} rows")
        for row, (params, gen) in enumerate(zip(params_list, generators)):
            if params.seed is not None and gen is None:
                raise ValueError(f"generators[{row}]: the row has seed={params.seed} but no generator")
            if gen is not None and gen.device.type != device.type:
                raise ValueError(f"generators[{row}]: lives on {gen.device}, the batch on {device}")
        if default_generator is not None and default_generator.device.type != device.type:
            raise ValueError(f"default_generator: lives on {default_generator.device}, the batch on {device}")

        greedy = [p.greedy for p in params_list]
        temperature = [1.0 if g else p.temperature for p, g in zip(params_list, greedy)]
        # Filters never change an argmax, so greedy rows get neutral values: they then neither turn
        # a filter on for the batch nor cost it work.
        top_k = [0 if g else p.top_k for p, g in zip(params_list, greedy)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params_list, greedy)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params_list, greedy)]
        rep = [p.repetition_penalty for p in params_list]
        pres = [p.presence_penalty for p in params_list]
        freq = [p.frequency_penalty for p in params_list]
        uses_rep = [r != 1.0 for r in rep]
        uses_output = [pr != 0.0 or fr != 0.0 for pr, fr in zip(pres, freq)]

        repetition_tokens = output_tokens = banned_tokens = None
        if any(uses_rep):
            repetition_tokens = _flatten_ids(
                [[("prompt_ids_list", prompt_ids_list[r]), ("output_ids_list", output_ids_list[r])] if uses_rep[r]
                 else [] for r in range(n)], vocab_size, device)
        if any(uses_output):
            output_tokens = _flatten_ids(
                [[("output_ids_list", output_ids_list[r])] if uses_output[r] else [] for r in range(n)],
                vocab_size, device)
        if banned_token_ids is not None and any(b is not None and len(b) for b in banned_token_ids):
            banned_tokens = _flatten_ids([[("banned_token_ids", b)] if b is not None else [] for b in banned_token_ids],
                                         vocab_size, device)

        # One host-to-device copy for all per-row values (top_k fits a float32 exactly: any k at
        # or above 2^24 keeps the whole vocabulary, as does 2^24 itself).
        packed = np.asarray([temperature, top_p, min_p, rep, pres, freq, [min(k, 1 << 24) for k in top_k], greedy],
                            dtype=np.float32)
        if (previous is not None and previous.row_values is not None and previous.temperature.device == device
                and np.array_equal(previous.row_values, packed)):
            row_tensors = {name: getattr(previous, name) for name in _ROW_FIELDS}
        else:
            rows = _to_device(packed, device)
            row_tensors = dict(zip(_ROW_FIELDS[:6], rows[:6]), top_k=rows[6].long(), greedy=rows[7] > 0)
        requested = [p.logprobs for p in params_list if p.logprobs is not None]
        return cls(
            **row_tensors,
            repetition_tokens=repetition_tokens,
            output_tokens=output_tokens,
            banned_tokens=banned_tokens,
            generators=tuple(generators),
            default_generator=default_generator,
            seeded_rows=tuple(r for r, g in enumerate(generators) if g is not None and not greedy[r]),
            num_logprobs=tuple(p.logprobs for p in params_list),
            all_greedy=all(greedy),
            max_top_k=max(top_k),
            use_top_p=any(p < 1.0 for p in top_p),
            use_min_p=any(m > 0.0 for m in min_p),
            use_penalties=any(uses_rep) or any(uses_output),
            max_num_logprobs=max(requested) if requested else None,
            row_values=packed,
        )


def _flatten_ids(parts_per_row: Sequence[Sequence[tuple[str, TokenIds]]], vocab_size: Optional[int],
                 device: torch.device) -> torch.Tensor:
    """Per row, named id sequences -> int64 [2, count] (row index; id) pairs, built with numpy
    rather than per-token Python and copied to the device in one piece. An id outside
    [0, vocab_size) raises a ValueError naming the argument and row, e.g. `output_ids_list[3]`."""
    names, rows, arrays = [], [], []
    for row, parts in enumerate(parts_per_row):
        for name, seq in parts:
            names.append(name)
            rows.append(row)
            arrays.append(np.asarray(seq, dtype=np.int64).reshape(-1))
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    # One vectorized range check; the slow search for the culprit runs only on bad input.
    bad = (ids < 0) | (ids >= vocab_size) if vocab_size is not None else ids < 0
    if bad.any():
        part = int(np.searchsorted(np.cumsum(lengths), int(np.argmax(bad)), side="right"))
        raise ValueError(f"{names[part]}[{rows[part]}]: token ids must be in [0, {vocab_size or 'vocab'}), "
                         f"got min {arrays[part].min()} max {arrays[part].max()}")
    row_of_each_id = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    return _to_device(np.stack([row_of_each_id, ids]), device)


# The per-row tensors, in the order of the packed host array's rows.
_ROW_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
               "top_k", "greedy")


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return tensor
    # Pinned + non_blocking: the copies queue behind the forward pass instead of stalling the host.
    return tensor.pin_memory().to(device, non_blocking=True)
