"""Fine-tuning through transformers' Trainer optimises the router losses too (Mixtral's convention)."""

import torch
from helpers import small_config
from transformers import Trainer, TrainingArguments

from dsmoe.hf import DSMoEConfig, DSMoEForCausalLM


def test_loss_is_lm_loss_plus_the_weighted_router_losses():
    torch.manual_seed(0)
    cfg = small_config(alpha_att=0.5, alpha_mlp=0.25)
    model = DSMoEForCausalLM(DSMoEConfig.from_model_config(cfg))
    idx = torch.randint(0, 97, (2, 10))
    out = model(idx, labels=idx)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.mi_att + 0.25 * out.mi_mlp)
    torch.testing.assert_close(out.aux_loss, out.loss - out.lm_loss)
    assert out.aux_loss.abs() > 0 and out.switch is None


class Batches(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=16):
        self.ids = torch.randint(0, 97, (n, seq), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def mlp_mi_after_trainer(tmp_path, alpha_mlp):
    torch.manual_seed(0)
    model = DSMoEForCausalLM(DSMoEConfig.from_model_config(small_config(alpha_att=0.0, alpha_mlp=alpha_mlp)))
    args = TrainingArguments(
        output_dir=str(tmp_path / f"alpha-{alpha_mlp}"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=Batches()).train()
    with torch.no_grad():
        ids = Batches().ids
        return model(ids, labels=ids).mi_mlp.item()


def test_trainer_moves_the_mutual_information_loss(tmp_path):
    # The same run with and without the MI term: only a loss that includes it pushes the routers towards
    # confident, balanced routing (MI is minimised), so the MI loss must end lower with the term.
    without = mlp_mi_after_trainer(tmp_path, 0.0)
    with_mi = mlp_mi_after_trainer(tmp_path, 5.0)
    assert with_mi < without - 0.05, (with_mi, without)
