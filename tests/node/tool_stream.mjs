// The official openai npm package assembles a streamed tool call from tiergate with its stream helper.
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "none", maxRetries: 0 });
const tools = [
  {
    type: "function",
    function: {
      name: "get_time",
      description: "The local time in a city",
      parameters: {
        type: "object",
        properties: { city: { type: "string", maxLength: 30 } },
        required: ["city"],
        additionalProperties: false,
      },
    },
  },
];
let argumentDeltas = 0;
const stream = client.chat.completions.stream({
  model,
  messages: [{ role: "user", content: "What time is it in Rome?" }],
  tools,
  tool_choice: "required",
  max_tokens: 40,
  temperature: 0,
});
stream.on("chunk", (chunk) => {
  if (chunk.choices[0]?.delta?.tool_calls?.[0]?.function?.arguments) argumentDeltas += 1;
});
const final = await stream.finalChatCompletion();
const choice = final.choices[0];
console.log(JSON.stringify({ finish: choice.finish_reason, calls: choice.message.tool_calls, argumentDeltas }));
