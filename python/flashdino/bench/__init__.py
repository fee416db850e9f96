"""flashdino's one benchmark harness (``flashdino bench``; the scripts in ``benchmarks/`` use it).

- :mod:`.timing`: warm-up, per-call CUDA events or host clock, median and quartiles, interleaving;
- :mod:`.probes`: the device's GEMM rate and copy bandwidth, the denominators of every utilisation;
- :mod:`.flops`: model FLOPs, the numerators;
- :mod:`.backends`: forcing a flashdino backend and recording which one ran;
- :mod:`.peers`: HF eager, torch.compile(HF), timm and flashdino's paths on the same weights;
- :mod:`.targets`, :mod:`.report`: the performance targets, JSON + markdown with the machine;
- :mod:`.e2e`: the end-to-end command itself.
"""

from .e2e import build_parser, main, search_largest
from .flops import flop_breakdown, model_flops, tokens_per_image
from .peers import PEERS, compare_tokens
from .probes import measure_copy_bandwidth, measure_gemm_rate
from .targets import TARGETS, build_plan, evaluate_targets

__all__ = ["main", "build_parser", "build_plan", "search_largest", "model_flops", "flop_breakdown",
           "tokens_per_image", "TARGETS", "PEERS", "measure_gemm_rate", "measure_copy_bandwidth", "compare_tokens",
           "evaluate_targets"]
