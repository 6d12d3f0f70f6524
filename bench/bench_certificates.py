"""Forward passes of a fixed 90%-sparse model as the certificates run them: masked layers vs the certificate form.

Randomized smoothing (N = 10,000 noisy copies per image in the study) and
CC-Cert run a fixed model without gradients, batch after batch. The study's
models: SmallCNN at width 0.25 (the csam comparison) and 0.5 on 1x28x28
inputs, 90% of the weights pruned by magnitude, batch 1000 (the study's
smoothing batch), eval mode, ``torch.no_grad()``. Forms:

* ``masked``: the model as loaded (masked layers, the fused masked ops);
* ``certificate``: ``sparsesam.evaluation.certificate_form`` of the plain
  model (masks baked into nn.Conv2d / nn.Linear, channels_last).

In the report: ``.venv/bin/python bench/report.py --suite certificates``
"""
from __future__ import annotations

import pytest
import torch

import sparsesam
from sparsesam.models.small_cnn import SmallCNN
from sparsesam.nn import export
from sparsesam.pruning import magnitude_prune
from sparsesam.evaluation import certificate_form

WIDTHS = [8, 16]  # channels of the first layer: study widths 0.25 and 0.5
BATCH = 1000
KERNEL = "certificates"  # report.py groups and tabulates by this


def masked_model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = sparsesam.sparsify(SmallCNN(1, 10, width, 28))
    magnitude_prune(model, 0.9)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    built = {}
    for width in WIDTHS:
        masked = masked_model(width)
        built[width] = {"masked": masked, "certificate": certificate_form(export(masked))}
    return built


def test_certificate_form_computes_the_masked_function(models):
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for forms in models.values():
        with torch.no_grad():
            torch.testing.assert_close(forms["certificate"](x), forms["masked"](x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["masked", "certificate"])
@pytest.mark.parametrize("width", WIDTHS)
def test_certificates(benchmark, models, impl, width):
    model = models[width][impl]
    x = torch.rand(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    benchmark.group = f"SmallCNN width {width} (90% sparse) forward, batch {BATCH}"
    benchmark.extra_info.update(kernel=KERNEL, batch=BATCH, width=width)

    def forward():
        with torch.no_grad():
            model(x)
    benchmark.pedantic(forward, rounds=15, warmup_rounds=2)


def rates(seconds: float = 3.0) -> dict:
    """{width: {form: images per CPU-second}}: forms in turns (A B A B), process CPU time, one thread.

    CPU time rather than wall time: the rate a certificate gets from one core,
    close to the quiet-machine rate even while other jobs share the machine.
    """
    import time
    torch.set_num_threads(1)
    x = torch.rand(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    found = {}
    for width in WIDTHS:
        masked = masked_model(width)
        forms = {"masked": masked, "certificate": certificate_form(export(masked))}
        counted = {name: [0, 0.0] for name in forms}
        with torch.no_grad():
            for model in forms.values():
                model(x)
            for _ in range(2):
                for name, model in forms.items():
                    start, n = time.process_time(), 0
                    while time.process_time() - start < seconds / 2:
                        model(x)
                        n += BATCH
                    counted[name][0] += n
                    counted[name][1] += time.process_time() - start
        found[width] = {name: n / s for name, (n, s) in counted.items()}
    return found


if __name__ == "__main__":
    import os
    print(f"load average {os.getloadavg()[0]:.2f}")
    for width, forms in rates().items():
        print(f"SmallCNN width {width}: masked {forms['masked']:.0f}, certificate form {forms['certificate']:.0f} "
              f"images per CPU-second ({forms['certificate'] / forms['masked']:.1f}x)")
