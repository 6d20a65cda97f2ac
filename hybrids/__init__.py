"""hybrids: RNN-like sequence mixers hybridized with sliding-window attention, for scaling-law sweeps."""

__version__ = "0.1.0"
