import torch
from torch import nn

from datasets.batch import Batch
from models.base import CTRTrainModule, build_ctr_train_module, weighted_bce_loss
from tests.models.batch_helpers import make_batch, tiny_schema


class _Fixed(nn.Module):
    """Returns the given logits (with a parameter so that gradients can be checked)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.logits


def _batch(labels: torch.Tensor, weights: torch.Tensor) -> Batch:
    b = labels.size(0)
    scalars = {"user_id": [1] * b, "item_id": [2] * b, "item_category": [3] * b}
    sequences = {"hist_item_id": [[4]] * b, "hist_category": [[5]] * b}
    return make_batch(tiny_schema(("click", "like")), scalars, sequences, labels, weights)


LOGITS = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-0.3, 1.5], [1.0, 1.0]])
LABELS = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
WEIGHTS = torch.tensor([1.0, 2.0, 0.5, 0.0])  # last row is padding


def test_loss_is_weighted_mean_over_samples_summed_over_tasks():
    expected = 0.0
    for t in range(2):
        total = 0.0
        for b in range(4):
            p = torch.sigmoid(LOGITS[b, t])
            y = LABELS[b, t]
            total += WEIGHTS[b] * -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
        expected += total / WEIGHTS.sum()
    torch.testing.assert_close(weighted_bce_loss(LOGITS, LABELS, WEIGHTS), expected)


def test_train_module_contract_and_padding_rows_ignored():
    module = build_ctr_train_module(_Fixed(LOGITS), cfg=None)
    assert isinstance(module, CTRTrainModule)
    batch = _batch(LABELS, WEIGHTS)
    loss, out = module(batch)
    assert loss.requires_grad and not out.loss.requires_grad and not out.logits.requires_grad
    torch.testing.assert_close(out.loss, loss.detach())
    torch.testing.assert_close(out.logits, LOGITS)
    torch.testing.assert_close(out.labels, LABELS)
    # evaluation rows: the mask follows batch.valid on every task, groups are the batch's group ids
    assert out.mask.tolist() == batch.valid.unsqueeze(1).expand_as(LOGITS).tolist()
    assert out.groups.tolist() == batch.group_ids.tolist()
    flipped = LABELS.clone()
    flipped[3] = 1 - flipped[3]
    loss_flipped, _ = module(_batch(flipped, WEIGHTS))
    torch.testing.assert_close(loss_flipped, loss)
    loss.backward()
    assert torch.all(module.model.logits.grad[3] == 0) and torch.all(module.model.logits.grad[:3] != 0)
    # A real row's label does change the loss.
    flipped[0] = 1 - flipped[0]
    assert not torch.allclose(module(_batch(flipped, WEIGHTS))[0], loss)


def test_all_padding_batch_gives_zero_loss():
    module = CTRTrainModule(_Fixed(LOGITS))
    loss, _ = module(_batch(LABELS, torch.zeros(4)))
    assert loss.item() == 0.0
