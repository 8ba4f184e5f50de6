# Client code written for Meta's original, as its users write it: its example's shape (fire,
# Llama.build with Meta's arguments, results printed as its example prints them), then
# research-style calls on the model itself (scoring with forward(tokens, 0), a long input fed
# in chunks). Nothing here guards for rank: the original's build silences ranks above 0.
# Run by tests/test_meta_api.py as plain python and under torchrun.

import fire
import torch

from llama import Dialog, Llama  # noqa: F401 (imported as the original's users do
from llama.generation import B_INST, E_INST  # noqa: F401


def main(ckpt_dir: str, tokenizer_path: str, temperature: float = 0.0, top_p: float = 0.9,
         max_seq_len: int = 64, max_gen_len: int = 8, max_batch_size: int = 4):
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
    )
    prompts = ["I believe the meaning of life is", "Simply put, the theory of relativity ",
               "A brief message congratulating the team", "Translate English to French:"]
    results = generator.text_completion(prompts, max_gen_len=max_gen_len,
                                        temperature=temperature, top_p=top_p)
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")

    # Scoring: the log-likelihood of a text, from one pass over it.
    text = generator.tokenizer.encode("The list is a mutable sequence of items.", bos=True,
                                      eos=False)
    tokens = torch.tensor([text])
    logits = generator.model.forward(tokens, 0)
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
    score = logprobs.gather(1, tokens[0, 1:, None]).sum().item()
    print(f"score {score:.4f}")
    # The same text fed in two chunks continues one sequence.
    half = len(text) // 2
    first = generator.model.forward(tokens[:, :half], 0)
    second = generator.model.forward(tokens[:, half:], half)
    chunked = torch.cat([first, second], dim=1)
    print(f"chunked max diff {(chunked - logits).abs().max().item():.1e}")
    print("logits " + " ".join(f"{x:.4f}" for x in logits[0, -1, :8].tolist()))


if __name__ == "__main__":
    fire.Fire(main)
