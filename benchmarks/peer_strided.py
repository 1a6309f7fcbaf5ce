"""The team's learn2learn peer benchmark on W1s (strided Conv4, no max-pool).

``shared/bench/peers/bench_torch.py`` knows only max-pool Conv4 settings. This wrapper, run
with the peer virtualenv's python, adds an ``omniglot-strided`` setting (the MAML paper's
Omniglot network: 3x3 convolutions with stride 2 and padding 1, 28 -> 14 -> 7 -> 4 -> 2,
so the head sees 64 * 2 * 2 features), swaps the peer's Conv4 for that network and then
runs the peer script's own ``main`` unchanged, so timing and the result line are the peer's.

    ~/venv-peers/bin/python benchmarks/peer_strided.py --peer-dir ../shared/bench/peers \\
        --impl l2l --setting omniglot-strided --algo maml

``bench_learners.py`` calls it for W1s. Torch is never imported by paddlefsl itself.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path


def _install(peer_dir: Path) -> object:
    sys.path.insert(0, str(peer_dir))
    import bench_torch  # the peer script, as a module
    import common
    import torch.nn as nn

    common.SETTINGS["omniglot-strided"] = dict(common.SETTINGS["omniglot"], feat=64 * 2 * 2)

    class StridedConv4(nn.Module):
        def __init__(self, s: dict) -> None:
            super().__init__()
            layers, cin = [], s["in_ch"]
            for i in range(common.N_BLOCKS):
                layers += [
                    (f"conv{i}", nn.Conv2d(cin, s["ch"], 3, stride=2, padding=1)),
                    (f"bn{i}", nn.BatchNorm2d(s["ch"], track_running_stats=False)),
                    (f"relu{i}", nn.ReLU()),
                ]
                cin = s["ch"]
            layers.append(("flatten", nn.Flatten()))
            self.features = nn.Sequential(OrderedDict(layers))
            self.head = nn.Linear(s["feat"], s["ways"])

        def forward(self, x):
            return self.head(self.features(x))

    bench_torch.Conv4 = StridedConv4
    return bench_torch


def main() -> None:
    args = sys.argv[1:]
    if "--peer-dir" not in args:
        raise SystemExit("peer_strided.py: pass --peer-dir <shared/bench/peers>")
    i = args.index("--peer-dir")
    peer_dir = Path(args[i + 1]).resolve()
    del args[i : i + 2]
    if not (peer_dir / "bench_torch.py").is_file():
        raise SystemExit(f"peer_strided.py: no bench_torch.py in {peer_dir}")
    bench_torch = _install(peer_dir)
    sys.argv = [str(peer_dir / "bench_torch.py"), *args]
    bench_torch.main()


if __name__ == "__main__":
    main()
