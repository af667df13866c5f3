"""Loads bidora's peft adapter folders with Hugging Face peft and compares the outputs with
bidora's adapted forward program (run by tests/tests/export.rs, which writes the request).

    python3 tests/peft_check.py request.json

The base models are rebuilt with the recipe that made the fixtures (models/make_fixtures.py:
same configurations, same seed), checked first against each fixture's reference logits, so a
difference is the adapter's. Exit code 3: torch, transformers or peft are not installed.
"""
import json
import os
import sys

try:
    import numpy as np
    import torch
    from peft import PeftModel
except ImportError as e:  # the Rust test skips before calling us; this is for manual runs
    print(f"SKIPPED: {e}")
    sys.exit(3)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "models"))
import make_fixtures  # noqa: E402

TOL = 1e-4  # torch vs tract, f32, differently ordered sums; measured values are printed


def base_model(family):
    """The fixture's model as a plain transformers class (peft calls forward with keywords)."""
    torch.manual_seed(make_fixtures.SEED)
    wrapped = make_fixtures.tiny(family)
    make_fixtures.randomise(wrapped)
    cls = type(wrapped).__mro__[1]
    model = cls(wrapped.config)
    model.load_state_dict(wrapped.state_dict())
    return model.eval()


def main():
    req = json.load(open(sys.argv[1]))
    failed = False
    for case in req["cases"]:
        ids = torch.tensor(case["input_ids"])
        mask = torch.tensor(case["attention_mask"])
        shape = case["shape"]
        model = base_model(case["family"])
        ref = json.load(open(case["reference"]))
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask).logits
        ref_diff = float(np.abs(plain.numpy().ravel() - np.array(ref["logits"])).max())
        base_diff = float(np.abs(plain.numpy().ravel() - np.array(case["base"])).max())
        peft_model = PeftModel.from_pretrained(model, case["adapter"]).eval()
        with torch.no_grad():
            got = peft_model(input_ids=ids, attention_mask=mask).logits.numpy()
        want = np.array(case["expected"], dtype=np.float32).reshape(shape)
        diff = float(np.abs(got - want).max())
        moved = float(np.abs(want.ravel() - np.array(case["base"])).max())
        ok = ref_diff <= TOL and base_diff <= TOL and diff <= TOL
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case['name']:<34} peft vs bidora {diff:.2e} "
              f"(adapter moved logits by {moved:.2e}; base vs reference {ref_diff:.2e}, "
              f"vs tract {base_diff:.2e})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
