"""What ``epmq demo`` runs on the benchmark: merges, quantizers, bit widths, anchors."""

from ..pipeline import Control, MergePlan, Plan
from .benchmark import DEFAULT_SCALES

# E-PMQ's output-space anchor lam, relative to the expert term, chosen on validation among
# these; 0 (no anchoring: pure expert targets) is there to show what anchoring does.
ANCHORS = [0.0, 0.1, 1.0, 10.0]


def default_plan(quick: bool = False) -> Plan:
    """Task Arithmetic and TIES (scales chosen on validation), each quantized with RTN, GPTQ,
    E-PMQ and two controls at 4, 3 and 2 bits (and 8, below), one scale and zero point per output channel
    (the encoder's layers are 64 and 256 wide). 8 bits is there as the reference where
    rounding costs almost nothing: what each method's continuous target is worth.

    Controls: GPTQ with full-precision-path targets (asymmetric calibration, no experts: what
    E-PMQ's gain owes to asymmetric calibration alone) and E-PMQ with expert-path targets.
    ``quick``: Task Arithmetic only, 4 and 2 bits, one anchor: a smoke test.
    """
    merges = [MergePlan("task_arithmetic", scales=list(DEFAULT_SCALES["task_arithmetic"]))]
    if not quick:
        merges.append(MergePlan("ties", scales=list(DEFAULT_SCALES["ties"]),
                                params={"density": 0.2, "scope": "global", "merge": "mean"}))
    controls = [Control("gptq", "fp_path", "GPTQ fp-path")]
    if not quick:
        controls.append(Control("epmq", "expert_path", "E-PMQ expert-path"))
    return Plan(
        merges=merges,
        methods=["rtn", "gptq", "epmq"],
        bits=[4, 2] if quick else [8, 4, 3, 2],
        group_size=-1,
        anchors=[1.0] if quick else list(ANCHORS),
        controls=controls,
        save_checkpoints=True,
    )
