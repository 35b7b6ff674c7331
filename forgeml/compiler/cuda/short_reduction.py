"""ShortReduction: kernels whose only reduction is short (depthwise convolutions, 7x7 pools), one thread
per output element."""

from __future__ import annotations


def short_reduction_rule(max_extent: int = 49):
    """A rule for kernels whose only reduction is short (depthwise convolutions: kh*kw; 7x7 pools):
    one thread per output element, the reduction in its registers (dlight's Fallback schedule).

    dlight's Reduction/GeneralReduction give each output row a thread block that reduces cooperatively,
    so a 3x3 depthwise convolution kept 9 of 256 threads busy: MobileNetV2 at batch 32 took 69 ms on
    an H200 (PyTorch eager: 6 ms).
    """
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    def reduction_extents(func) -> list[int | None]:
        sch = s_tir.Schedule(func)
        extents: list[int | None] = []

        def walk(block_rv) -> None:
            for child in sch.get_child_blocks(block_rv):
                block = sch.get(child)
                red = [iv.dom.extent for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
                if red:
                    total = 1
                    for e in red:
                        total = total * int(e) if isinstance(e, tirx.IntImm) else None if total is None else None
                    extents.append(total)
                walk(child)

        walk(sch.get_sblock("root"))
        return extents

    class ShortReduction(GPUScheduleRule):
        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            extents = reduction_extents(func)
            if len(extents) != 1 or extents[0] is None or extents[0] > max_extent:
                return None
            return dl.gpu.Fallback().apply(func, target, tunable)

    return ShortReduction()
