"""Forward time of the packed (dequantize-on-the-fly) CAMERA-Q model against the bf16 reference model.

Reference model in bf16 on the CPU, CAMERA-Q at 2.0 average bits (RTN, packed), one 8x128 test batch,
median of 3 rounds x 7 forwards, interleaved. Prints both times and their ratio.

    python benchmarks/quant_speed.py
"""
import copy
import itertools
import statistics
import time

import torch

import camera_pl
from camera_pl.data import TextDataModule
from camera_pl import quantize
model, tok = camera_pl.reference_model(dtype=torch.bfloat16)
dm = TextDataModule(tok, block_size=128, batch_size=8, max_documents=40); dm.setup()
calib = list(itertools.islice(dm.val_dataloader(), 4))
batch = {k: v for k, v in next(iter(dm.test_dataloader())).items() if k != "labels"}
stats = camera_pl.collect_stats(model, calib)
q = copy.deepcopy(model)
quantize(q, stats, method="camera", avg_bits=2.0)
def t(m, n=7):
    with torch.no_grad():
        m(**batch); ts = []
        for _ in range(n):
            s = time.perf_counter(); m(**batch); ts.append(time.perf_counter() - s)
    return statistics.median(ts)
a, b = [], []
for _ in range(3):
    a.append(t(model)); b.append(t(q))
print(f"bf16 {statistics.median(a)*1e3:.1f} ms, packed 2.0-bit camera {statistics.median(b)*1e3:.1f} ms, ratio {statistics.median(b)/statistics.median(a):.2f}x (reference model, CPU bf16, 8x128 tokens, median of 3x7 interleaved forwards)")
