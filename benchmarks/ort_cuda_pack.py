"""Carry ONNX Runtime's CUDA provider to a GPU machine that has only the CPU onnxruntime and no package
index: onnxruntime-gpu's wheel (256 MB; its CUDA provider holds cubins for sm_75..sm_120) cut down to
one GPU architecture, as a tar.xz of about 58 MiB.

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 -d /tmp/ortgpu onnxruntime-gpu==1.31.1
    python benchmarks/ort_cuda_pack.py /tmp/ortgpu/onnxruntime_gpu-*.whl -o .ortgpu/site.tar.xz --sm 90
    # on the GPU machine: mkdir -p /root/ortsite && tar -C /root/ortsite -xJf .ortgpu/site.tar.xz
    #   LD_LIBRARY_PATH=<site-packages>/nvidia/*/lib PYTHONPATH=/root/ortsite python3 ...

Every fatbin entry for another architecture is zeroed in place (the layout stays; the driver picks the
entry for its own architecture and never reads the others); a fatbin with no entry for `--sm` keeps
everything. The C API library (not used by the Python module) is left out, and the TensorRT provider
unless --with-tensorrt (it also needs TensorRT's own libraries, libnvinfer, on the GPU machine: where
they are missing the onnxruntime-trt-fp16 baseline reports "provider not available").
Check the result on the GPU: `verify.onnxruntime_cuda_runner` refuses a session that fell back to CPU.
"""

from __future__ import annotations

import argparse
import io
import lzma
import struct
import tarfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
TENSORRT = "libonnxruntime_providers_tensorrt.so"
LEFT_OUT = ("libonnxruntime.so", "onnxruntime/transformers/", "onnxruntime/quantization/", "onnxruntime/tools/")


def _section(elf: bytes, name: bytes) -> tuple[int, int]:
    """(file offset, size) of an ELF64 section by name."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    str_off, = struct.unpack_from("<Q", elf, shoff + shstrndx * shentsize + 0x18)
    for i in range(shnum):
        header = shoff + i * shentsize
        name_off, = struct.unpack_from("<I", elf, header)
        if elf[str_off + name_off:].split(b"\0", 1)[0] == name:
            offset, size = struct.unpack_from("<QQ", elf, header + 0x18)
            return offset, size
    raise ValueError(f"no {name.decode()} section")


def keep_one_arch(elf: bytes, sm: int) -> tuple[bytes, int]:
    """The library with every fatbin entry for another architecture zeroed; (bytes, zeroed bytes)."""
    data = bytearray(elf)
    pos, size = _section(elf, b".nv_fatbin")
    end, zeroed = pos + size, 0
    while pos < end:
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:  # alignment padding between fatbins
            pos += 8
            continue
        entries, entry = [], pos + header_size
        while entry < pos + header_size + fat_size:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch, = struct.unpack_from("<I", data, entry + 28)
            entries.append((arch, entry + entry_header, payload))
            entry += entry_header + payload
        if any(arch == sm for arch, _, _ in entries):
            for arch, start, payload in entries:
                if arch != sm:
                    data[start:start + payload] = bytes(payload)
                    zeroed += payload
        pos += header_size + fat_size
    return bytes(data), zeroed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path(".ortgpu/site.tar.xz"))
    parser.add_argument("--sm", type=int, default=90, help="GPU architecture to keep (90: H100/H200)")
    parser.add_argument("--with-tensorrt", action="store_true", help="keep the TensorRT provider library")
    args = parser.parse_args()
    left_out = LEFT_OUT if args.with_tensorrt else (*LEFT_OUT, TENSORRT)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(args.wheel) as wheel, lzma.open(args.output, "wb", preset=6) as xz, \
            tarfile.open(fileobj=xz, mode="w") as tar:
        for info in wheel.infolist():
            if info.is_dir() or any(part in info.filename for part in left_out):
                continue
            data = wheel.read(info)
            if info.filename.endswith("libonnxruntime_providers_cuda.so"):
                data, zeroed = keep_one_arch(data, args.sm)
                print(f"{info.filename}: {zeroed / 1e6:.0f} of {len(data) / 1e6:.0f} MB zeroed (not sm_{args.sm})")
            member = tarfile.TarInfo(info.filename)
            member.size, member.mode = len(data), 0o755 if info.filename.endswith(".so") else 0o644
            tar.addfile(member, io.BytesIO(data))
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
