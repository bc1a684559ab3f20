"""One preset, one shape: time and peak memory of a few training steps (fused AdamW, bf16 autocast), eager or with
the fast path (compiled blocks + chunked loss). A quick check next to benchmarks/training.py, which runs the whole
side-by-side comparison.

    python benchmarks/train_step_probe.py --preset 350m --batch 8 --seq 2048 [--fast]
"""
import argparse
import time

import torch

import fastxlstm


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="350m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--fast", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = fastxlstm.build_model(a.preset, vocab_size=a.vocab)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    if a.fast:
        m.compile_blocks()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device="cuda")
    for it in range(a.steps):
        torch.cuda.reset_peak_memory_stats()
        t = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if a.fast:
                loss = m(ids, return_state=False, labels=ids).loss
            else:
                logits = m(ids, return_state=False).logits
        if not a.fast:
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1))
            del logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.time() - t
        print(f"{'fast' if a.fast else 'eager'} {a.preset} B={a.batch} S={a.seq} step {it}: {dt:.2f} s, "
              f"{a.batch * a.seq / dt:,.0f} tok/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
              flush=True)


if __name__ == "__main__":
    main()
