"""What a benchmark is: a Case (a name and parameters) whose build() returns a Setup (the
methods to time, each a zero-argument callable, and what the timings are compared with)."""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch

# Column order of every table and plot.
METHOD_ORDER = ("copy", "dense", "naive", "dense+compile", "naive+compile", "ours", "ours+cls")


@dataclass(frozen=True)
class Config:
    device: str
    dtype: torch.dtype
    quick: bool  # tiny shapes and few rounds: the smoke run of the tests
    compile: bool  # add torch.compile of the dense and naive methods
    rounds: Optional[int] = None  # at least this many timed rounds per method (None: the device's default)
    flex: bool = True  # time the torch.compile(flex_attention) peers (minutes of compiling on a CPU)


@dataclass(frozen=True)
class Unavailable:
    """A method that cannot run in this checkout (e.g. sparse_ops.patch has not landed)."""

    reason: str


Method = Union[Callable[[], object], Unavailable]


@dataclass
class Setup:
    methods: Dict[str, Union[Method, Exception]]  # an exception: that method failed to build
    baseline: str = "dense"  # speedups are over this method
    flops: Optional[Tuple[float, float]] = None  # (dense, sparse): ideal speedup = dense / sparse
    bytes: Optional[int] = None  # bytes a memory-bound op moves: GB/s, and % of the "copy" method
    sparsity: Optional[float] = None  # x axis of the plots (the suite says of what)
    grad: bool = False  # time with autograd enabled (the methods run a backward themselves)
    # name -> (method a, method b): reported as median(a) / median(b) - 1
    overheads: Dict[str, Tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    suite: str
    name: str  # unique, "<suite>/...": what --case matches
    group: str  # the cases of a group share a plot, one curve per method over sparsity
    params: dict
    build: Callable[[], Setup]  # a functools.partial: bound when listed, not to the loop variables' last values


def compiled(methods: Dict[str, Method], cfg: Config, names=("dense", "naive")) -> Dict[str, Method]:
    """methods plus "<name>+compile" = torch.compile of each of names (when cfg.compile)."""
    if not cfg.compile:
        return methods
    extra = {f"{n}+compile": torch.compile(methods[n], dynamic=False) for n in names if callable(methods.get(n))}
    return {**methods, **extra}


NO_FLEX = Unavailable("left out (--no-flex, the default with --quick): torch.compile(flex_attention) "
                      "compiles for minutes on a CPU")


def pick(cfg: Config, quick, cpu, cuda):
    """A setting for the run's scale: the --quick smoke run, the CPU default, the GPU default."""
    return quick if cfg.quick else cuda if cfg.device == "cuda" else cpu


def guarded(make: Callable[[], Method]) -> Union[Method, Exception]:
    """make(), or the exception it raised: one method failing to build fails only that method."""
    try:
        return make()
    except Exception as e:
        return e
