"""The quantization grid a layer is rounded onto."""

from dataclasses import dataclass

from epmq_kernels.grid import is_bits, is_flag

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a weight matrix ``W[out, in]``.

    bits          2, 3, 4 or 8.
    group_size    -1: one scale and zero point per output row ("per channel"); otherwise a
                  positive number of input columns sharing one scale and zero point per row.
    sym           symmetric grid (zero point fixed at 2**(bits-1)) instead of min-max.
    act_order     GPTQ processes columns by decreasing diag(H) (ignored by RTN: no H there).
    static_groups grid parameters of every group taken from the original target up front,
                  so that with act_order the group index stays monotone in the stored order.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False

    def __post_init__(self):
        # (numpy's integers and bools are taken, a sweep's values read from arrays, and held as
        # Python's: the spec's dict is written to JSON, which has no np.int64)
        if not is_bits(self.bits) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if not is_bits(self.group_size) or (self.group_size != -1 and self.group_size <= 0):  # (an integer, as bits)
            raise ValueError(
                f"group_size must be -1 (per output channel) or a positive integer, "
                f"got {self.group_size!r}"
            )
        for name in ("sym", "act_order", "static_groups"):
            if not is_flag(getattr(self, name)):  # (YAML's 'no' would be a truthy string)
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, kind in (("bits", int), ("group_size", int), ("sym", bool), ("act_order", bool),
                           ("static_groups", bool)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, d_in: int) -> int:
        """Number of groups of a layer with ``d_in`` input columns: ``ceil(d_in / group_size)``
        (a size that does not divide ``d_in`` leaves a shorter last group, as in the GPTQ
        reference and the checkpoints GPTQModel writes)."""
        if self.group_size == -1:
            return 1
        return -(-d_in // self.group_size)

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "act_order": self.act_order,
            "static_groups": self.static_groups,
        }
