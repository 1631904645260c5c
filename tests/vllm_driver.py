"""Runs one vLLM engine over a prompt file and writes what it generated (a subprocess of
tests/test_vllm_connector.py: each engine gets a fresh process, as in production)."""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kvstore-config", help="JSON kvstore config; omit for an engine without connector")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--sequential", action="store_true", help="one generate() call per prompt, in order")
    ap.add_argument("--prefix-caching", action="store_true", help="keep vLLM's own prefix cache on")
    ap.add_argument("--connector", default="kvstore.connectors.vllm:KVStoreConnector",
                    help="MODULE:CLASS of the connector (tests/vllm_faults.py injects faults)")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds to wait between sequential prompts")
    ap.add_argument("--max-num-batched-tokens", type=int, help="chunked prefill's step budget")
    ap.add_argument("--long-prefill-threshold", type=int, default=0,
                    help="long_prefill_token_threshold: prefill long prompts over several steps")
    ap.add_argument("--hf-overrides", default="{}", help="JSON hf_overrides for the model config")
    ap.add_argument("--kv-params", help="JSON list: each prompt's kv_transfer_params (or null)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kv = None
    if args.kvstore_config:
        module, cls = args.connector.split(":")
        kv = KVTransferConfig(kv_connector=cls, kv_role="kv_both", kv_connector_module_path=module,
                              kv_connector_extra_config={"kvstore_config": json.loads(args.kvstore_config)})
    # vLLM's own prefix cache is off unless asked, so every reused token is one kvstore supplied.
    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32", block_size=32, max_model_len=2048,
              enforce_eager=True, enable_prefix_caching=args.prefix_caching, kv_transfer_config=kv, seed=0,
              max_num_seqs=4, hf_overrides=json.loads(args.hf_overrides),
              **({"max_num_batched_tokens": args.max_num_batched_tokens, "enable_chunked_prefill": True}
                 if args.max_num_batched_tokens else {}),
              **({"long_prefill_token_threshold": args.long_prefill_threshold} if args.long_prefill_threshold else {}))
    # logprobs=0: the chosen token's logprob, to compare with an engine without kvstore
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False,
                            logprobs=0)
    prompts = json.load(open(args.prompts))
    kv_params = json.loads(args.kv_params) if args.kv_params else [None] * len(prompts)
    # Each prompt's own params: kv_transfer_params ride in extra_args, as vLLM's API server puts them.
    per_prompt = [params if p is None else params.clone() for p in kv_params]
    for sp, p in zip(per_prompt, kv_params):
        if p is not None:
            sp.extra_args = {"kv_transfer_params": p}
    order = list(zip(prompts, per_prompt))
    batches = [[x] for x in order] if args.sequential else [order]
    results = []
    for i, batch in enumerate(batches):
        if i and args.pause:
            time.sleep(args.pause)
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], [sp for _, sp in batch], use_tqdm=False)
        for o in outs:
            c = o.outputs[0]
            results.append({"tokens": list(c.token_ids), "num_cached_tokens": o.num_cached_tokens,
                            "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
    json.dump(results, open(args.out, "w"))
    del llm


if __name__ == "__main__":
    main()
