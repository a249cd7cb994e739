// The official @anthropic-ai/sdk npm package streams a tool call from tiergate's /v1/messages and assembles it.
import Anthropic from "@anthropic-ai/sdk";

const [baseURL, model, apiKey] = process.argv.slice(2);
const client = new Anthropic({ baseURL: baseURL.replace(/\/v1\/?$/, ""), apiKey, maxRetries: 0 });
const tools = [
  {
    name: "get_time",
    description: "The local time in a city",
    input_schema: {
      type: "object",
      properties: { city: { type: "string", maxLength: 30 } },
      required: ["city"],
      additionalProperties: false,
    },
  },
];
const fragments = [];
const stream = client.messages.stream({
  model,
  max_tokens: 40,
  messages: [{ role: "user", content: "What time is it in Rome?" }],
  tools,
  tool_choice: { type: "any" },
  temperature: 0,
});
stream.on("inputJson", (partialJson) => fragments.push(partialJson));
const final = await stream.finalMessage();
const calls = final.content.filter((block) => block.type === "tool_use");
console.log(JSON.stringify({ stopReason: final.stop_reason, calls, joined: fragments.join(""), usage: final.usage }));
