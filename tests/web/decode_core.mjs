// Runs the browser runtime's decode step on given inputs, for tests/test_web.py to compare with
// qlora_rt/runtime/decode.py:  node decode_core.mjs SPEC.json  ->  JSON on stdout.
// SPEC: { feeds: [[ids, length, keep], ...], chunks: [[ids, start, manifest], ...], picks: [{ logits, options }],
//         replies: [{ vocab: [strings], ids, options, eos, capacity, logits: [[...], ...] }, ...] }
import { readFileSync } from "node:fs";
import { feedValues, pick, promptChunk, promptChunks, Reply } from "../../qlora_rt/web/qlora-rt.mjs";

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const out = {
  feeds: spec.feeds.map(([ids, length, keep]) => feedValues(ids, length, keep)),
  // the sampler's cut: the first and the last token it may pick (a draw of 0, and of just under 1)
  picks: spec.picks.map(({ logits, options }) => [0, 1 - 1e-12].map((u) => pick(Float32Array.from(logits), options, () => u))),
  chunks: spec.chunks.map(([ids, start, meta]) => promptChunks(ids, start, promptChunk(meta, ids.length))),
  replies: spec.replies.map(({ vocab, ids, options, eos, capacity, logits }) => {
    const reply = new Reply(ids, options, (tokens) => tokens.map((t) => vocab[t]).join(""), new Set(eos), capacity);
    const pieces = [];
    for (const row of logits) {
      const piece = reply.take(Float32Array.from(row, (v) => (v === "NaN" ? NaN : v)));
      pieces.push(piece ? piece.text : null);
      if (reply.finish) break;
    }
    return { pieces, tokens: reply.tokens, finish: reply.finish, text: reply.text.text };
  }),
};
process.stdout.write(JSON.stringify(out));
