"""The nano training step (autoglm_fast/train/train.py): answer-only labels, gradients reach every
part of the model, and a few seeded steps fit a fixed batch."""
import pytest
import torch

from autoglm_fast.train import data
from autoglm_fast.train.tokenizer import build_nano_tokenizer
from autoglm_fast.train.train import IGNORE, encode_example, loss_fn, make_batch, make_model, train_step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok, config = build_nano_tokenizer(tmp_path_factory.mktemp("tok"))
    return tok, config, make_batch(list(data.examples("train", 8, seed=0)), tok, config)


def test_labels_score_only_the_answer(setup):
    tok, config, _ = setup
    for ex in data.examples("train", 8, seed=0):
        ids, labels, media = encode_example(ex, tok, config)
        assert len(ids) == len(labels)
        scored = [t for t in labels if t != IGNORE]
        assert scored[-1] == config.eos_token_ids[0]
        assert tok.decode(scored[:-1]) == data.target_text(ex)
        first = labels.index(scored[0])
        assert ids[first + 1] == scored[0]  # shifted: position t predicts ids[t + 1]
        assert len(media) == sum(isinstance(p, dict) and p["type"] != "text"
                                 for p in (ex["messages"][0]["content"] if isinstance(ex["messages"][0]["content"], list) else []))


def test_gradients_reach_every_part(setup):
    _, config, batch = setup
    model = make_model(config, seed=0)
    loss_fn(model, batch).backward()
    unused = {"vision_tower.vision_model.post_layernorm.weight", "vision_tower.vision_model.post_layernorm.bias"}
    for name, p in model.named_parameters():  # feature_layer=-1 reads the last layer before post-LN
        if p.requires_grad and name not in unused:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_steps_lower_the_loss(setup):
    _, config, batch = setup
    torch.manual_seed(0)
    model = make_model(config, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = [train_step(model, opt, batch) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_image_token_dropout_leaves_vision_only_the_gate(setup):
    """With every row dropped, only the vision summary v (the mean of the image tokens) reaches the
    text: shuffling the image tokens around their mean leaves the loss unchanged. Without dropout the
    backbone reads the tokens themselves and the loss moves."""
    _, config, batch = setup
    model = make_model(config, seed=0).eval()

    def spread(module, args, out):  # each image's tokens pushed apart, their mean unchanged
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return out + 20 * (noise - noise.mean(1, keepdim=True))

    with torch.no_grad():
        plain = {p: loss_fn(model, batch, p) for p in (0.0, 1.0)}
        handle = model.vision_connector.register_forward_hook(spread)
        spread_out = {p: loss_fn(model, batch, p) for p in (0.0, 1.0)}
        handle.remove()
    assert abs(float(plain[1.0] - spread_out[1.0])) < 1e-5
    assert abs(float(plain[0.0] - spread_out[0.0])) > 1e-3
    with pytest.raises(ValueError, match="image_token_dropout"):
        loss_fn(model, batch, 1.5)
