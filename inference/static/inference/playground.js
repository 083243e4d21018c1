// The dashboard's playground (inference/views.py): one chat completion, streamed,
// sent as a partner's app sends it, to /v1/chat/completions, as the signed-in
// member (the session cookie, the CSRF token, X-Organization). Nothing here
// prices or counts: the usage and the credits shown are the API's own figures.
//
// Credits are integers of micro-credits. They are read from the JSON as BigInt
// from their source text, never through a float, and shown as amount_display
// (metering.services.postings) shows them.
"use strict";

(function () {
  const form = document.getElementById("playground");
  if (!form) return;

  const $ = (id) => document.getElementById(id);
  const { model, system, user, max_tokens: maxTokens, temperature, seed, send, stop } = form.elements;
  const [answer, status, error, usage] = ["pg-answer", "pg-status", "pg-error", "pg-usage"].map($);
  const available = form.querySelector("[data-figure=available]");
  const figure = (name) => usage.querySelector(`[data-figure=${name}]`);

  const CREDIT_FIELDS = new Set(["credits_charged", "credits_remaining", "available"]);
  const TERMINAL = new Set(["succeeded", "failed", "canceled", "expired"]);
  const JSON_NUMBER = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?$/;
  const PLACEHOLDER_KEY = "YOUR_API_KEY";

  // --- exact credits ---------------------------------------------------------------

  function parseJson(text) {
    // Chromium and Firefox hand the reviver each number's source text, so a
    // credit amount becomes a BigInt without passing through a float; older
    // browsers give the number, exact as long as it is a safe integer.
    return JSON.parse(text, function (key, value, context) {
      if (!CREDIT_FIELDS.has(key) || typeof value !== "number") return value;
      if (context && typeof context.source === "string") return BigInt(context.source);
      if (!Number.isSafeInteger(value)) throw new Error(`${key} is not exact in this browser`);
      return BigInt(value);
    });
  }

  function creditsDisplay(micro) {
    const sign = micro < 0n ? "-" : "";
    const magnitude = micro < 0n ? -micro : micro;
    const whole = magnitude / 1000000n;
    const fraction = (magnitude % 1000000n).toString().padStart(6, "0").replace(/0+$/, "");
    return sign + whole.toString() + (fraction ? "." + fraction : "");
  }

  function showCredits(element, micro) {
    element.dataset.micro = micro.toString();
    element.textContent = creditsDisplay(micro);
  }

  // --- the request the form describes -------------------------------------------

  // A number as the member typed it (so the body, and the snippets, say exactly
  // that), a string if it is not a JSON number (the API then refuses it, 400,
  // naming the field), or nothing when left blank (the API's default).
  function numberField(input) {
    const text = input.value.trim();
    if (text === "") return undefined;
    return JSON_NUMBER.test(text) ? { json: text } : { json: JSON.stringify(text) };
  }

  // [name, JSON text] pairs, in the order the snippets show them.
  function requestFields() {
    const messages = [];
    if (system.value !== "") messages.push({ role: "system", content: system.value });
    messages.push({ role: "user", content: user.value });
    const fields = [
      ["model", JSON.stringify(model.value)],
      ["messages", messages],
    ];
    for (const [name, input] of [["max_tokens", maxTokens], ["temperature", temperature], ["seed", seed]]) {
      const value = numberField(input);
      if (value !== undefined) fields.push([name, value.json]);
    }
    fields.push(["stream", "true"], ["stream_options", '{"include_usage": true}']);
    return fields;
  }

  function messagesJson(messages, indent) {
    const items = messages.map(
      (m) => `${indent}  {"role": ${JSON.stringify(m.role)}, "content": ${JSON.stringify(m.content)}}`
    );
    return `[\n${items.join(",\n")}\n${indent}]`;
  }

  function bodyJson(fields, indent) {
    const lines = fields.map(([name, value]) => {
      const text = Array.isArray(value) ? messagesJson(value, indent + "  ") : value;
      return `${indent}  ${JSON.stringify(name)}: ${text}`;
    });
    return `{\n${lines.join(",\n")}\n${indent}}`;
  }

  function pythonLiteral(jsonText) {
    // The JSON of a string, number or boolean is the same Python literal, but for
    // true/false/null.
    return { true: "True", false: "False", null: "None" }[jsonText] || jsonText;
  }

  function curlSnippet(fields) {
    const body = bodyJson(fields, "").replace(/'/g, "'\\''");
    const url = `${form.dataset.apiBase}/chat/completions`;
    return [
      `curl -N ${url} \\`,
      `  -H "Authorization: Bearer ${PLACEHOLDER_KEY}" \\`,
      `  -H "Content-Type: application/json" \\`,
      `  -d '${body}'`,
    ].join("\n");
  }

  function pythonSnippet(fields) {
    const args = fields.map(([name, value]) => {
      if (name === "messages") {
        const items = value.map(
          (m) => `        {"role": ${JSON.stringify(m.role)}, "content": ${JSON.stringify(m.content)}},`
        );
        return `    messages=[\n${items.join("\n")}\n    ],`;
      }
      if (name === "stream_options") return `    stream_options={"include_usage": True},`;
      return `    ${name}=${pythonLiteral(value)},`;
    });
    return [
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url=${JSON.stringify(form.dataset.apiBase)}, api_key=${JSON.stringify(PLACEHOLDER_KEY)})`,
      "stream = client.chat.completions.create(",
      ...args,
      ")",
      "for chunk in stream:",
      "    if chunk.choices and chunk.choices[0].delta.content:",
      '        print(chunk.choices[0].delta.content, end="", flush=True)',
      "    if chunk.usage:",
      "        print()",
      "        print(chunk.usage)",
    ].join("\n");
  }

  function drawSnippets() {
    const fields = requestFields();
    $("pg-curl").textContent = curlSnippet(fields);
    $("pg-python").textContent = pythonSnippet(fields);
  }

  function fitMaxTokens() {
    const option = model.selectedOptions[0];
    if (!option) return;
    const most = Number(option.dataset.maxOutputTokens);
    maxTokens.max = String(most);
    if (Number(maxTokens.value) > most) maxTokens.value = String(most);
  }

  // --- sending, and reading the answer ---------------------------------------------

  let controller = null;

  function setBusy(busy) {
    send.disabled = busy;
    stop.disabled = !busy;
  }

  function showError(code, message, param) {
    error.hidden = false;
    error.dataset.errorCode = code;
    error.textContent = `${code}: ${message}` + (param ? ` (${param})` : "");
  }

  function showUsage({ prompt, cached, completion, charged, remaining }) {
    figure("prompt-tokens").textContent = String(prompt);
    figure("cached-tokens").textContent = String(cached);
    figure("completion-tokens").textContent = String(completion);
    showCredits(figure("credits-charged"), charged);
    if (remaining !== undefined) {
      showCredits(figure("credits-remaining"), remaining);
      showCredits(available, remaining);
    }
    usage.hidden = false;
  }

  function headers() {
    return {
      "Content-Type": "application/json",
      "X-CSRFToken": form.querySelector("[name=csrfmiddlewaretoken]").value,
      "X-Organization": form.dataset.organization,
    };
  }

  async function refusal(response) {
    // The API's errors have OpenAI's shape: {"error": {"code", "message", "param"}}.
    const text = await response.text();
    try {
      const body = parseJson(text).error;
      if (body && body.code) {
        body.retryAfter = Number(response.headers.get("Retry-After")) || 0;
        return body;
      }
    } catch (_) {
      // not the API's JSON (a proxy's page): said by its status below
    }
    return { code: `http_${response.status}`, message: text.slice(0, 300) || response.statusText };
  }

  // Each `data: ...` event of the SSE stream, as it arrives.
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (line.startsWith("data: ")) yield line.slice("data: ".length);
        }
      }
    }
  }

  async function read(response) {
    let finish = null;
    let failed = false;
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = parseJson(data);
      if (chunk.error) {
        // A job that failed before its first token, behind a backlog.
        showError(chunk.error.code, chunk.error.message, chunk.error.param);
        failed = true;
        continue;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      // The job's own reason ("cancelled" too), where the choice has OpenAI's nearest.
      if (chunk.gym && chunk.gym.finish_reason) finish = chunk.gym.finish_reason;
      if (chunk.gym && chunk.gym.error) {
        // A failure after tokens (the run limit, the engine): billed for them.
        showError(chunk.gym.error.code, chunk.gym.error.message);
        failed = true;
      }
      if (chunk.usage && chunk.gym) {
        showUsage({
          prompt: chunk.usage.prompt_tokens,
          cached: chunk.usage.prompt_tokens_details.cached_tokens,
          completion: chunk.usage.completion_tokens,
          charged: chunk.gym.credits_charged,
          remaining: chunk.gym.credits_remaining,
        });
      }
    }
    if (failed) status.textContent = "Failed.";
    else status.textContent = finish ? `Done (finish_reason: ${finish}).` : "The stream ended.";
  }

  async function getJson(url) {
    const response = await fetch(url, { headers: headers(), credentials: "same-origin" });
    if (!response.ok) throw await refusal(response);
    return parseJson(await response.text());
  }

  // The server cancels a job whose client went away, but only if it sees the
  // connection close: a proxy that buffers the stream may hide that, and leave the
  // job running to its limit. So Stop also asks for the cancel; a job already
  // ended answers 409, which is fine.
  async function cancelStopped(jobId) {
    const url = `${form.dataset.jobs}/${encodeURIComponent(jobId)}/cancel`;
    const response = await fetch(url, {
      method: "POST",
      headers: headers(),
      body: "{}",
      credentials: "same-origin",
    });
    if (!response.ok && response.status !== 409) throw await refusal(response);
  }

  // A stopped stream carries no usage: the job's own record says what it was
  // charged once its worker has settled it (within a second or two).
  async function billOfStopped(jobId) {
    status.textContent = "Stopped. Waiting for what the job was charged…";
    const url = `${form.dataset.jobs}/${encodeURIComponent(jobId)}`;
    // Each read counts against the organization's request limit, which its API keys
    // share: back off (0.5, 1, 2, 4, 8, 8 s: seven reads in about 24 s), and wait as
    // long as a 429's Retry-After asks.
    let job = await getJson(url);
    for (let wait = 500, reads = 1; !TERMINAL.has(job.status) && reads < 7; reads++) {
      await new Promise((resolve) => setTimeout(resolve, wait));
      wait = Math.min(wait * 2, 8000);
      try {
        job = await getJson(url);
      } catch (refused) {
        if (refused.code !== "rate_limited" || !refused.retryAfter) throw refused;
        wait = Math.max(wait, refused.retryAfter * 1000);
      }
    }
    if (!TERMINAL.has(job.status)) {
      status.textContent = `Stopped. The job ${jobId} is still ${job.status}; see GET /api/v1/jobs/${jobId}.`;
      return;
    }
    const balance = await getJson(form.dataset.balance);
    showUsage({
      prompt: job.input_tokens,
      cached: job.cached_input_tokens,
      completion: job.output_tokens,
      charged: BigInt(job.credits_charged),
      remaining: balance.available,
    });
    status.textContent = `Stopped: the job ended ${job.status}, charged for what it produced.`;
  }

  async function submit(event) {
    event.preventDefault();
    if (controller) return;
    controller = new AbortController();
    setBusy(true);
    answer.textContent = "";
    error.hidden = true;
    delete error.dataset.errorCode;
    usage.hidden = true;
    status.textContent = "Sending…";
    const fields = requestFields();
    const body = bodyJson(fields, "");
    let jobId = null;
    try {
      const response = await fetch(form.dataset.endpoint, {
        method: "POST",
        headers: headers(),
        body,
        credentials: "same-origin",
        signal: controller.signal,
      });
      jobId = response.headers.get("X-Gym-Job-Id");
      if (!response.ok) {
        const refused = await refusal(response);
        showError(refused.code, refused.message, refused.param);
        status.textContent = `Refused (${response.status}).`;
        return;
      }
      status.textContent = "Generating…";
      await read(response);
    } catch (failure) {
      if (failure && failure.name === "AbortError") {
        if (jobId) {
          try {
            await cancelStopped(jobId);
            await billOfStopped(jobId);
          } catch (refused) {
            showError(refused.code || "error", refused.message || String(refused));
          }
        } else {
          status.textContent = "Stopped before the answer began: see GET /api/v1/jobs for what ran.";
        }
      } else if (failure && failure.code) {
        showError(failure.code, failure.message, failure.param);
      } else {
        showError("network_error", `The answer was cut off: ${failure}.`);
        status.textContent = jobId ? `See GET /api/v1/jobs/${jobId} for what it was charged.` : "";
      }
    } finally {
      controller = null;
      setBusy(false);
    }
  }

  form.addEventListener("submit", submit);
  stop.addEventListener("click", () => controller && controller.abort());
  model.addEventListener("change", fitMaxTokens);
  form.addEventListener("input", drawSnippets);
  form.addEventListener("change", drawSnippets);
  fitMaxTokens();
  drawSnippets();
})();
