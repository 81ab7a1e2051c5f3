"""``attnzoo bench modules``: every registered ``attnzoo.nn`` module at its standard size.

Each module registered with :func:`attnzoo.nn.register_module` declares a standard input size
(``ModuleExample.inputs``: a stage-1 image for vision mixers, a 56x56 feature map for CNN blocks,
1024 tokens for sequence layers). This benchmark builds it there and measures

* parameters (count) and the forward's multiply-accumulates where torch's FLOP counter sees them;
* forward time (inference, ``torch.no_grad``) and forward + backward time (training), median and
  quartiles of :func:`attnzoo.bench.timing.time_call` repeats;
* the output's shape, so a row says what the module produced.

Rows go to the results database under kind ``"modules"``; ``attnzoo report`` tables them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..nn import ModuleEntry, list_modules
from .machine import machine_info
from .results import case_key, config_json, Result, ResultStore
from .timing import Timing, time_call

__all__ = ["ModulesConfig", "ModuleRow", "run_modules"]


@dataclass(frozen=True)
class ModulesConfig:
    modules: Optional[tuple[str, ...]] = None  # names; None: every registered module
    families: Optional[tuple[str, ...]] = None
    size: str = "bench"  # "bench" (standard) or "test" (the suite's small size: a smoke run)
    budget_s: float = 0.3
    max_repeats: int = 20
    train: bool = True
    seed: int = 0


@dataclass
class ModuleRow:
    module: str
    family: str
    catalog: tuple[str, ...]
    input_shapes: list[tuple[int, ...]]
    output_shape: tuple[int, ...]
    params: int
    gflops: Optional[float]
    forward: Timing
    train: Optional[Timing] = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def selected(config: ModulesConfig) -> list[ModuleEntry]:
    entries = [e for e in list_modules() if e.example is not None]
    if config.modules is not None:
        entries = [e for e in entries if e.name in config.modules]
    if config.families is not None:
        entries = [e for e in entries if e.family in config.families]
    return entries


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _flops(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> Optional[float]:
    """GFLOPs of one forward as torch's FLOP counter sees them (matmuls, convs, SDPA); None if it fails."""
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(*inputs)
        return counter.get_total_flops() / 1e9
    except Exception:  # noqa: BLE001 - a counting failure must not lose the timing row
        return None


def measure(entry: ModuleEntry, config: ModulesConfig) -> ModuleRow:
    """Build ``entry`` at the configured size and time it."""
    torch.manual_seed(config.seed)
    module = entry.build(config.size)
    gen = torch.Generator().manual_seed(config.seed)
    shapes = entry.example.shapes(config.size)
    inputs = [torch.randn(*s, generator=gen) for s in shapes]
    module.eval()
    with torch.no_grad():
        out = _first(module(*inputs))
    gflops = _flops(module, inputs)

    def forward() -> Any:
        with torch.no_grad():
            return module(*inputs)

    fwd = time_call(forward, budget_s=config.budget_s, max_repeats=config.max_repeats)
    train_timing = None
    if config.train:
        module.train()
        leaves = [x.clone().requires_grad_() for x in inputs]

        def step() -> None:
            module.zero_grad(set_to_none=True)
            _first(module(*leaves)).float().square().mean().backward()

        train_timing = time_call(step, budget_s=config.budget_s, max_repeats=config.max_repeats)
    return ModuleRow(
        module=entry.name,
        family=entry.family,
        catalog=entry.catalog,
        input_shapes=[tuple(s) for s in shapes],
        output_shape=tuple(out.shape),
        params=sum(p.numel() for p in module.parameters()),
        gflops=gflops,
        forward=fwd,
        train=train_timing,
    )


def run_modules(
    config: ModulesConfig, store: Optional[ResultStore] = None, on_row: Optional[Callable[[ModuleRow], None]] = None
) -> list[ModuleRow]:
    """Every selected module; returns the rows (never prints). With ``store`` each row is written
    as it finishes, under a new run of kind ``"modules"``."""
    run_id = store.start_run("modules", config_json(config), machine_info("cpu")) if store is not None else None
    rows = []
    for entry in selected(config):
        try:
            row = measure(entry, config)
        except Exception as err:  # noqa: BLE001 - one broken module is a row with its error, not a lost run
            row = ModuleRow(entry.name, entry.family, entry.catalog, [], (), 0, None, Timing(float("nan"), float("nan"), float("nan"), 0),
                            note=f"{type(err).__name__}: {err}")
        rows.append(row)
        if store is not None and run_id is not None:
            store.add(run_id, _result(row, config))
        if on_row is not None:
            on_row(row)
    if store is not None and run_id is not None:
        store.finish_run(run_id)
    return rows


def _result(row: ModuleRow, config: ModulesConfig) -> Result:
    identity = {"module": row.module, "inputs": row.input_shapes, "size": config.size}
    return Result(
        kind="modules",
        mechanism=row.module,
        case_key=case_key("modules", identity),
        mode="forward",
        dtype="float32",
        device="cpu",
        median_ms=row.forward.median_ms,
        q1_ms=row.forward.q1_ms,
        q3_ms=row.forward.q3_ms,
        repeats=row.forward.repeats,
        metrics={
            "family": row.family,
            "catalog": list(row.catalog),
            "inputs": [list(s) for s in row.input_shapes],
            "output": list(row.output_shape),
            "params": row.params,
            "gflops": row.gflops,
            "train_median_ms": None if row.train is None else row.train.median_ms,
        },
        note=row.note,
    )
