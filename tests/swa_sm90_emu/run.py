"""Runs one call of the SWA Hopper emulator in its own process (tests/test_swa_sm90_emu.py):
python run.py LIB IN OUT. IN is a torch.save'd dict (op "fwd" or "bwd", shape ints, contiguous CPU
tensors); OUT gets the output tensors and the launcher's return code. A protocol error inside the
emulator exits this process with status 3 and a message on stderr."""
import ctypes
import sys

import torch


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def main(lib_path, in_path, out_path):
    lib = ctypes.CDLL(lib_path)
    a = torch.load(in_path)
    q, k, v = a["q"], a["k"], a["v"]
    cu = a.get("cu_seqlens")
    fp16 = int(q.dtype == torch.float16)
    args = [ctypes.c_int(x) for x in (fp16, a["D"], a["B"], a["L"], a["hq"], a["hkv"], a["window"], a["sinks"])]
    args += [ctypes.c_float(a["scale"]), ptr(cu), ctypes.c_int64(a["total_rows"])]
    if a["op"] == "fwd":
        out = torch.full_like(q, float("nan"))
        lse = torch.full(a["lse_shape"], float("nan"), dtype=torch.float32)
        rc = lib.emu_swa_fwd_sm90(*args, ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ctypes.c_int(int(a.get("pingpong", 0))))
        torch.save({"rc": rc, "out": out, "lse": lse}, out_path)
    else:
        dq = torch.full_like(q, float("nan"))
        dk = torch.full_like(k, float("nan"))
        dv = torch.full_like(v, float("nan"))
        # "atomic": the one-kernel backward; dq = dq_accum * scale in the input dtype, as the op does.
        accum = torch.zeros(q.shape, dtype=torch.float32) if a.get("atomic") else None
        rc = lib.emu_swa_bwd_sm90(*args, ptr(q), ptr(k), ptr(v), ptr(a["dout"]), ptr(a["lse"]), ptr(a["delta"]),
                                  ptr(dq), ptr(dk), ptr(dv), ptr(accum), ctypes.c_int(a.get("num_sms", 0)))
        if accum is not None:
            dq = (accum * a["scale"]).to(q.dtype)
        torch.save({"rc": rc, "dq": dq, "dk": dk, "dv": dv}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
