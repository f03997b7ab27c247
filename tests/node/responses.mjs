// The Node `openai` SDK against the proxy's Responses API (run by tests/test_node_sdk.py).
// Usage: node responses.mjs BASE_URL
// Prints one JSON line: the whole answer, the streamed one, the event types, the answering
// instance, or the status of the error the SDK raised.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "none", maxRetries: 0 });
const out = {};
try {
  const { data, response } = await client.responses
    .create({ model: "auto", input: "tell me about failover", max_output_tokens: 50 })
    .withResponse();
  out.text = data.output_text;
  out.instance = response.headers.get("x-route-instance");
  const stream = await client.responses.create({
    model: "auto", input: "tell me about failover", stream: true });
  out.streamed = "";
  out.events = [];
  for await (const event of stream) {
    out.events.push(event.type);
    if (event.type === "response.output_text.delta") out.streamed += event.delta;
  }
} catch (err) {
  out.error = { name: err.constructor.name, status: err.status ?? null };
}
console.log(JSON.stringify(out));
