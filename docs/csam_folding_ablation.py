"""C-SAM folding ablation: binarise with the weights left as they are (default) or with W <- W*C folded in.

Starts from the demo's dense model (sparsesam demo --methods csam ... --out DEMO), the demo's data and batches.
Usage: python docs/csam_folding_ablation.py DEMO_DIR EPOCHS SEEDS...
"""
import sys
import torch
from torch.utils.data import DataLoader, Subset

from sparsesam.algorithms import CSAM, CSAMConfig
from sparsesam.model_files import load_model_folder
from sparsesam.nn import masked_layers
from sparsesam.training import evaluate
from sparsesam.run_setup import load_data


class FoldingCSAM(CSAM):
    """The previous binarisation: the soft values folded into the weights (W <- W*C) before the mask is fixed."""

    def _enter(self, phase, model, loader):
        if phase == "finetune":
            with torch.no_grad():
                for _, layer in masked_layers(model):
                    layer.weight.mul_(layer.weight_mask.detach())
        super()._enter(phase, model, loader)


demo, epochs, seeds = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3:]]
train, _ = load_data("fashion_mnist", None, 10000)
_, test = load_data("fashion_mnist", None, 1000)
test_loader = DataLoader(test, batch_size=512)
algo_set = Subset(train, range(2000))
rows = []
for fold in (False, True):
    for seed in seeds:
        torch.manual_seed(seed)
        model, _ = load_model_folder(f"{demo}/dense")
        loader = DataLoader(algo_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed))
        config = CSAMConfig(target_sparsity=0.9, seed=seed, mask_epochs=epochs, finetune_epochs=epochs)
        algorithm = (FoldingCSAM if fold else CSAM)(config)
        at_binarisation = {}
        enter = algorithm._enter

        def spy(phase, model, loader, enter=enter, at_binarisation=at_binarisation):
            enter(phase, model, loader)
            if phase == "finetune":
                at_binarisation["acc"] = evaluate(model, test_loader, progress=False)["accuracy"]

        algorithm._enter = spy
        result = algorithm.fit(model, loader, val_loader=test_loader, progress=False)
        rows.append((fold, seed, at_binarisation["acc"], result.summary["val_accuracy"]))
        print(f"fold={fold} seed={seed} acc_at_binarisation={at_binarisation['acc']:.4f} "
              f"acc_after_finetune={result.summary['val_accuracy']:.4f}", flush=True)
for fold in (False, True):
    mine = [r for r in rows if r[0] == fold]
    print(f"fold={fold}: mean acc at binarisation {sum(r[2] for r in mine) / len(mine):.4f}, "
          f"after fine-tuning {sum(r[3] for r in mine) / len(mine):.4f} over seeds {seeds}")
