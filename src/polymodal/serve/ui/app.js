// The web UI of `polymodal serve`: chat with streaming answers, image and audio attachments, image generation
// and an Artifacts panel. Plain JavaScript, no build step, nothing fetched from anywhere but this server.
//
// Safety rule: everything a model writes goes into this page as text (textContent), never as HTML. The one place
// model output is rendered is an artifact, inside an iframe with sandbox="allow-scripts" (no allow-same-origin:
// an opaque origin that cannot reach this page, its cookies or its storage) whose own CSP forbids all network.
"use strict";

// The page's CSP nonce (the server writes a fresh one per load). An about:srcdoc iframe inherits the page's CSP,
// so an artifact's scripts run only if they carry it; they still run sandboxed, with no network.
const NONCE = (document.currentScript && document.currentScript.nonce) || "";
const ARTIFACT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'";
const ARTIFACT_LANGS = new Set(["html", "svg", "xml"]);
const AUDIO_FORMATS = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/mpeg": "mp3",
                       "audio/mp3": "mp3", "audio/flac": "flac", "audio/x-flac": "flac", "audio/ogg": "ogg",
                       "audio/webm": "webm", "audio/mp4": "m4a", "audio/x-m4a": "m4a", "audio/aac": "aac"};

const $ = (id) => document.getElementById(id);
const state = {
  models: [],          // the cards of GET /v1/models
  history: [],         // OpenAI messages of this conversation
  attachments: [],     // {kind: "image" | "video", name, url} | {kind: "audio", name, data, format}
  controller: null,    // the AbortController of the answer being streamed
  artifacts: [],       // {label, source}
  apiKey: sessionStorage.getItem("polymodal.apiKey") || "",
  retry: null,         // what to run again once an API key is given
};

// ------------------------------------------------------------------------------------------------ helpers
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;  // text, never HTML
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children);  // strings become text nodes
  return node;
}

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.apiKey) h["Authorization"] = `Bearer ${state.apiKey}`;
  return h;
}

async function errorMessage(response) {
  // The server answers OpenAI's {"error": {"message": ...}}; anything else is shown as it came.
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}${text ? ": " + text.slice(0, 300) : ""}`;
}

function setStatus(text) {
  $("status").textContent = text;
  $("status").hidden = !text;
}

function askForKey(message, retry) {
  state.retry = retry || null;
  $("key-message").textContent = `${message} Enter the server's API key:`;
  $("key-form").hidden = false;
  $("api-key").focus();
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ------------------------------------------------------------------------------------------------ models
async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", {headers: headers(false)});
  } catch (e) {
    setStatus(`Cannot reach the server: ${e.message}`);
    return;
  }
  if (response.status === 401) return askForKey(await errorMessage(response), loadModels);
  if (!response.ok) return setStatus(await errorMessage(response));
  state.models = (await response.json()).data || [];
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...state.models.map((m) => el("option", {
    value: m.id, text: m.kind === "chat" ? m.id : `${m.id} (${m.kind})`, disabled: m.kind !== "chat"})));
  const chat = state.models.filter((m) => m.kind === "chat");
  if (chat.some((m) => m.id === previous)) select.value = previous;
  else if (chat.length) select.value = chat[0].id;
  // the image view lists the models whose card says they make images (`output_modalities`)
  const painters = state.models.filter((m) => (m.output_modalities || []).includes("image"));
  const imageSelect = $("image-model");
  imageSelect.replaceChildren(...painters.map((m) => el("option", {value: m.id, text: m.id})));
  imageSelect.hidden = !painters.length;
  if (painters.length && !chat.length) $("imagegen").open = true;
  setStatus(chat.length ? "" : painters.length ? "No chat model is served here; generate images below."
    : "No chat model is served here.");
  updateModel();
  updateImageModel();
  checkVoice();
}

function updateImageModel() {
  // Steps and size start from the image model's `image_defaults`; the seed stays empty (a random one).
  const model = state.models.find((m) => m.id === $("image-model").value) || {};
  const defaults = model.image_defaults || {};
  $("image-steps").value = defaults.steps ?? "";
  $("image-size").value = defaults.size ?? "";
}

function currentModel() {
  return state.models.find((m) => m.id === $("model").value);
}

function updateModel() {
  // Media buttons follow what the chosen model takes (its card's `modalities`); the temperature and max tokens
  // controls start from its `generation_defaults` (a local model's recommended settings), or stay empty for the
  // server to choose. Settings the page has no control for (e.g. a repetition penalty) the server applies itself
  // to every request that leaves them out; the model line names them.
  const model = currentModel() || {};
  const modalities = model.modalities || [];
  const defaults = model.generation_defaults || {};
  $("attach-image").disabled = !modalities.includes("image");
  $("attach-audio").disabled = !modalities.includes("audio");
  $("attach-video").disabled = !modalities.includes("video");
  $("temperature").value = defaults.temperature ?? "";
  $("max-tokens").value = defaults.max_tokens ?? "";
  if (model.context_length) $("max-tokens").max = model.context_length;
  else $("max-tokens").removeAttribute("max");
  const others = Object.entries(defaults).filter(([k]) => k !== "temperature" && k !== "max_tokens")
    .map(([k, v]) => `${k.replace(/_/g, " ")} ${v}`);
  $("model-info").textContent = [modalities.length ? `takes ${modalities.join(", ")}` : "",
                                 others.length ? `model defaults: ${others.join(", ")}` : ""].filter(Boolean)
    .join("; ");
}

function settings() {
  // The request fields the controls set; an empty control leaves its field out (the server's default applies).
  // A value the server does not take (a temperature of 5) comes back as its 400, shown in the chat.
  const out = {};
  const temperature = $("temperature").value.trim();
  const maxTokens = $("max-tokens").value.trim();
  if (temperature !== "") out.temperature = Number(temperature);
  if (maxTokens !== "") out.max_tokens = Number(maxTokens);
  return out;
}

// ------------------------------------------------------------------------------------------------ attachments
async function addFiles(files) {
  for (const file of files) {
    try {
      if (file.type.startsWith("image/")) {
        state.attachments.push({kind: "image", name: file.name || "pasted image", url: await readAsDataURL(file)});
      } else if (file.type.startsWith("video/") || /\.(mp4|webm|mkv|mov|avi)$/i.test(file.name)) {
        state.attachments.push({kind: "video", name: file.name, url: await readAsDataURL(file)});
      } else if (file.type.startsWith("audio/") || /\.(wav|mp3|flac|ogg|m4a|webm|aac)$/i.test(file.name)) {
        const url = await readAsDataURL(file);
        const ext = (file.name.match(/\.(\w+)$/) || [])[1];
        const format = AUDIO_FORMATS[file.type] || (ext ? ext.toLowerCase() : "wav");
        state.attachments.push({kind: "audio", name: file.name, data: url.slice(url.indexOf(",") + 1), format});
      } else {
        setStatus(`${file.name} is not an image, a video or audio: not attached.`);
      }
    } catch (e) {
      setStatus(`Could not read ${file.name}: ${e.message}`);
    }
  }
  renderAttachments();
}

function renderAttachments() {
  $("attachments").replaceChildren(...state.attachments.map((a, i) => {
    const remove = el("button", {type: "button", class: "remove", title: "Remove", text: "×"});
    remove.addEventListener("click", () => { state.attachments.splice(i, 1); renderAttachments(); });
    const preview = a.kind === "image" ? el("img", {src: a.url, alt: a.name})
      : el("span", {text: `${a.kind === "video" ? "▶" : "♪"} ${a.name}`});
    return el("span", {class: `chip ${a.kind}`, "data-kind": a.kind}, preview, remove);
  }));
}

function userContent(text) {
  // A plain string, or OpenAI parts when media is attached.
  if (!state.attachments.length) return text;
  const parts = text ? [{type: "text", text}] : [];
  for (const a of state.attachments) {
    if (a.kind === "image") parts.push({type: "image_url", image_url: {url: a.url}});
    else if (a.kind === "video") parts.push({type: "video_url", video_url: {url: a.url}});
    else parts.push({type: "input_audio", input_audio: {data: a.data, format: a.format}});
  }
  return parts;
}

// ------------------------------------------------------------------------------------------------ messages
function addMessage(role) {
  const view = el("div", {class: `message ${role}`, "data-role": role},
                  el("div", {class: "who", text: role === "user" ? "You" : (currentModel() || {}).id || role}),
                  el("div", {class: "body"}));
  $("messages").append(view);
  view.scrollIntoView({block: "end"});
  return view;
}

function renderUser(view, text, attachments) {
  const body = view.querySelector(".body");
  if (text) body.append(el("div", {class: "text", text}));
  for (const a of attachments) {
    if (a.kind === "image") body.append(el("img", {class: "thumb", src: a.url, alt: a.name}));
    else if (a.kind === "video") body.append(el("video", {class: "thumb", src: a.url, controls: true, muted: true}));
    else body.append(el("div", {class: "audio", text: `♪ ${a.name}`}));
  }
}

function showError(view, message) {
  view.dataset.status = "error";
  view.querySelector(".body").append(el("div", {class: "error", text: message}));
}

// Split an answer into text and fenced code blocks (```lang ... ```); the last block may still be open.
function segments(text) {
  const out = [];
  let lines = [];
  let code = null;
  for (const line of text.split("\n")) {
    const open = line.match(/^\s*```\s*([\w+#.-]*)/);
    if (code === null && open) {
      if (lines.length) out.push({type: "text", text: lines.join("\n")});
      lines = [];
      code = {type: "code", lang: open[1].toLowerCase(), lines: [], closed: false};
    } else if (code !== null && /^\s*```\s*$/.test(line)) {
      code.closed = true;
      out.push(code);
      code = null;
    } else if (code !== null) {
      code.lines.push(line);
    } else {
      lines.push(line);
    }
  }
  if (code !== null) out.push(code);
  else if (lines.length) out.push({type: "text", text: lines.join("\n")});
  for (const s of out) if (s.type === "code") s.text = s.lines.join("\n");
  return out.filter((s) => s.type === "code" || s.text.trim());
}

function codeBlock(seg, final) {
  const copy = el("button", {type: "button", class: "copy", text: "Copy"});
  copy.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(seg.text); copy.textContent = "Copied"; }
    catch (_) { copy.textContent = "Copy failed"; }
  });
  const head = el("div", {class: "code-head"}, el("span", {text: seg.lang || "code"}), copy);
  if (final && seg.closed && ARTIFACT_LANGS.has(seg.lang)) {
    const index = addArtifact(seg.lang, seg.text);
    const show = el("button", {type: "button", class: "show-artifact", text: "Show in Artifacts"});
    show.addEventListener("click", () => showArtifact(index));
    head.append(show);
  }
  return el("div", {class: "code"}, head, el("pre", {}, el("code", {text: seg.text})));
}

function renderAnswer(view, text, final) {
  // Re-rendered on every piece; artifacts are made once, when the answer is complete.
  const body = view.querySelector(".body");
  const nodes = [];
  for (const seg of segments(text)) {
    if (seg.type === "code") {
      nodes.push(codeBlock(seg, final));
      continue;
    }
    nodes.push(el("div", {class: "text", text: seg.text}));
    if (final) for (const svg of seg.text.match(/<svg\b[\s\S]*?<\/svg>/gi) || []) addArtifact("svg", svg);
  }
  body.replaceChildren(...nodes);
}

// ------------------------------------------------------------------------------------------------ chat
async function readEvents(response, onData) {
  // A server-sent event stream: onData(the parsed JSON) for each `data:` line until the end or [DONE]; onData
  // returning true stops reading (the connection is closed).
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true}).replace(/\r/g, "");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        if (onData(JSON.parse(data))) {
          reader.cancel();
          return;
        }
      }
    }
  }
}

async function streamChat(model, messages, view) {
  // POST /v1/chat/completions with stream: true, read as server-sent events; Stop aborts the fetch, which closes
  // the connection, and the server cancels the generation.
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  view.dataset.status = "streaming";
  let text = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({model, messages, stream: true, ...settings()})});
    if (!response.ok) {
      const message = await errorMessage(response);
      if (response.status === 401) askForKey(message, null);
      showError(view, message);
      return {status: "error", text};
    }
    let failed = null;
    await readEvents(response, (chunk) => {
      if (chunk.error) {  // an error after the stream began comes inside it, as OpenAI does
        failed = chunk.error.message || "The server failed while answering.";
        return true;
      }
      const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (piece) {
        text += piece;
        renderAnswer(view, text, false);
      }
      return false;
    });
    if (failed !== null) {
      renderAnswer(view, text, true);
      showError(view, failed);
      return {status: "error", text};
    }
    renderAnswer(view, text, true);
    view.dataset.status = "done";
    return {status: "done", text};
  } catch (e) {
    if (e.name === "AbortError") {
      renderAnswer(view, text, true);
      view.querySelector(".body").append(el("div", {class: "muted", text: "(stopped)"}));
      view.dataset.status = "stopped";
      return {status: "stopped", text};
    }
    showError(view, `The connection failed: ${e.message}`);
    return {status: "error", text};
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.dataset.busy = busy ? "1" : "";
}

async function send(event) {
  event.preventDefault();
  if (state.controller) return;
  const text = $("prompt").value.trim();
  if (!text && !state.attachments.length) return;
  const model = $("model").value;
  if (!model) return setStatus("No chat model to send to.");
  const user = {role: "user", content: userContent(text)};
  const image = state.attachments.find((a) => a.kind === "image");
  renderUser(addMessage("user"), text, state.attachments);
  $("prompt").value = "";
  state.attachments = [];
  renderAttachments();
  const view = addMessage("assistant");
  const answer = await streamChat(model, [...state.history, user], view);
  if (answer.status !== "error") {  // a refused turn stays out of the history, so the next one can go through
    state.history.push(user, {role: "assistant", content: answer.text});
    if (image && (currentModel() || {}).grounding) await showRegions(view, model, image, answer.text);
  }
  view.scrollIntoView({block: "end"});
}

function newChat() {
  if (state.controller) state.controller.abort();
  endVoice();  // the server's spoken conversation ends too
  state.history = [];
  $("messages").replaceChildren();
}

// ------------------------------------------------------------------------------------------------ grounding
async function showRegions(view, model, image, text) {
  // The boxes and points of an answer about an image, drawn over it: the server reads them in the model's frame
  // (POST /v1/grounding) and gives them in the image's own pixels, which the SVG's viewBox is.
  const img = new Image();
  img.src = image.url;
  try {
    await img.decode();
    const response = await fetch("/v1/grounding", {method: "POST", headers: headers(), body: JSON.stringify(
      {model, text, image_size: [img.naturalWidth, img.naturalHeight]})});
    if (!response.ok) return;
    const regions = (await response.json()).data || [];
    if (!regions.length) return;
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
    svg.setAttribute("class", "regions");
    const stroke = Math.max(2, Math.min(img.naturalWidth, img.naturalHeight) / 200);
    const font = Math.max(10, Math.min(img.naturalWidth, img.naturalHeight) / 20);
    const shape = (tag, attrs) => {
      const node = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      svg.append(node);
      return node;
    };
    shape("image", {href: image.url, width: img.naturalWidth, height: img.naturalHeight});
    for (const r of regions) {
      const [x1, y1, x2, y2] = r.bbox_2d || [...r.point_2d, ...r.point_2d];
      if (r.bbox_2d) {
        shape("rect", {x: Math.min(x1, x2), y: Math.min(y1, y2), width: Math.abs(x2 - x1), height: Math.abs(y2 - y1),
                       fill: "none", stroke: "#e6194b", "stroke-width": stroke});
      } else {
        shape("circle", {cx: x1, cy: y1, r: 3 * stroke, fill: "none", stroke: "#e6194b", "stroke-width": stroke});
      }
      if (r.label) {
        shape("text", {x: Math.min(x1, x2), y: Math.max(Math.min(y1, y2) - stroke, font), fill: "#e6194b",
                       "font-size": font}).textContent = r.label;
      }
    }
    view.querySelector(".body").append(svg);
  } catch (e) {
    setStatus(`Could not draw the answer's boxes: ${e.message}`);
  }
}

// ------------------------------------------------------------------------------------------------ artifacts
function artifactDocument(source) {
  // The artifact's own CSP comes first, before any of its markup; its scripts get the page's nonce (see NONCE).
  const scripts = NONCE ? source.replace(/<script\b/gi, `<script nonce="${NONCE}"`) : source;
  return "<!doctype html><meta charset=\"utf-8\">" +
    `<meta http-equiv="Content-Security-Policy" content="${ARTIFACT_CSP}">` +
    "<style>html,body{margin:0;background:#fff;color:#111;font-family:system-ui,sans-serif}" +
    "body{padding:8px}svg{max-width:100%;height:auto}</style>" + scripts;
}

function addArtifact(kind, source) {
  state.artifacts.push({label: `${state.artifacts.length + 1}. ${kind}`, source});
  const index = state.artifacts.length - 1;
  const tab = el("button", {type: "button", class: "tab", text: state.artifacts[index].label});
  tab.addEventListener("click", () => showArtifact(index));
  $("artifact-tabs").append(tab);
  showArtifact(index);
  return index;
}

function showArtifact(index) {
  const frame = $("artifact-frame");
  frame.srcdoc = artifactDocument(state.artifacts[index].source);
  frame.hidden = false;
  $("artifact-empty").hidden = true;
  [...$("artifact-tabs").children].forEach((tab, i) => tab.classList.toggle("active", i === index));
}

// ------------------------------------------------------------------------------------------------ images
function imageRequest(prompt) {
  // POST /v1/images/generations with stream: true (the server sends each step's progress, then the images); the
  // model, steps, seed and size only when chosen, so the server's defaults apply otherwise.
  const body = {prompt, n: 1, response_format: "b64_json", stream: true};
  if (!$("image-model").hidden && $("image-model").value) body.model = $("image-model").value;
  const steps = $("image-steps").value.trim();
  const seed = $("image-seed").value.trim();
  const size = $("image-size").value.trim();
  if (steps !== "") body.steps = Number(steps);
  if (seed !== "") body.seed = Number(seed);
  if (size !== "") body.size = size;
  return body;
}

function showImageProgress(step, total) {
  $("imagegen-progress").hidden = step === null;
  if (step === null) return;
  $("image-progress").max = total || 1;
  $("image-progress").value = step;
  $("image-progress-text").textContent = total ? `Step ${step} of ${total}` : "Waiting for the model…";
}

async function generateImage(event) {
  event.preventDefault();
  const prompt = $("image-prompt").value.trim();
  const out = $("imagegen-out");
  if (!prompt || $("image-generate").disabled) return;
  out.replaceChildren();
  out.dataset.status = "generating";
  $("image-generate").disabled = true;
  showImageProgress(0, 0);
  const fail = (message) => {
    out.replaceChildren(el("p", {class: "error", text: message}));
    out.dataset.status = "error";
  };
  try {
    const response = await fetch("/v1/images/generations", {
      method: "POST", headers: headers(), body: JSON.stringify(imageRequest(prompt))});
    if (!response.ok) {
      const message = await errorMessage(response);
      if (response.status === 401) askForKey(message, null);
      return fail(message);
    }
    const images = [];
    let failed = null;
    await readEvents(response, (ev) => {
      if (ev.error) {
        failed = ev.error.message || "The server failed while generating.";
        return true;
      }
      if (ev.type === "image_generation.progress") showImageProgress(ev.step, ev.total);
      else if (ev.type === "image_generation.completed" && typeof ev.b64_json === "string") images.push(ev);
      return false;
    });
    if (failed !== null) return fail(failed);
    out.replaceChildren(...images.map((d) => el("figure", {},
      el("img", {class: "generated", alt: prompt, src: `data:image/png;base64,${d.b64_json}`}),
      el("figcaption", {class: "muted", text: `${d.size}, seed ${d.seed}`}))));
    out.dataset.status = "done";
  } catch (e) {
    fail(`The connection failed: ${e.message}`);
  } finally {
    showImageProgress(null);
    $("image-generate").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------------ voice
// Push to talk over WS /v1/realtime (docs/dialogue.md), when the server has the route (GET /v1/realtime says `enabled`).
// Hold Talk to speak, or click it to start and click again to stop. While it is on, the microphone goes to the server
// as 16-kHz PCM16 binary messages; while it is off, silence does, until the turn's answer is over: the server's
// turn-taking is paced by the audio it hears (its VAD hears the end of the turn in that silence), and speaking
// again while an answer plays interrupts it (barge-in). The user's transcript and the answer's text join the
// chat; the answer's audio is played as it arrives. The conversation lives on the server until New chat.
const VOICE_RATE = 16000;  // what the server hears
const HOLD_MS = 300;       // held longer than this: push-to-talk (off when released); a shorter click toggles
const SILENCE_MS = 2000;   // after release with no turn open: the microphone is closed after this much silence
const voice = {
  ws: null, ready: null, ctx: null, mic: null, source: null, processor: null,
  talking: false, held: false, pressedAt: 0, releasedAt: 0, open: 0,  // open: turns heard and not yet answered
  phase: 0, last: 0,                    // the resampler's position and last sample, carried across blocks
  outRate: 24000, playAt: 0, playing: [],
  said: "", answer: null, answerText: "",  // the turn's transcript, the answer's message view and text so far
};

async function checkVoice() {
  // The Talk button follows the server (GET /v1/realtime): disabled, with the reason as its tooltip, when it has no
  // realtime route. Checked after the models load, so that the API key is known by then.
  const talk = $("talk");
  let enabled = false;
  try {
    const response = await fetch("/v1/realtime", {headers: headers(false)});
    enabled = response.ok && Boolean((await response.json()).enabled);
  } catch (_) { /* no answer: off */ }
  const mic = Boolean(navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.AudioContext);
  talk.disabled = !enabled || !mic;
  talk.title = !enabled ? "This server has no realtime voice route (start it with `polymodal serve --realtime`)"
    : !mic ? "This browser gives no microphone to this page (it needs https:// or localhost)"
    : "Hold to speak, or click to start and click again to stop";
}

function openVoice() {
  // One websocket per conversation; resolves once the server's session.created has come.
  if (voice.ready) return voice.ready;
  voice.ready = new Promise((resolve, reject) => {
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
    // a browser cannot send an Authorization header on a websocket: the key goes as a subprotocol, as OpenAI's
    const protocols = ["realtime", ...(state.apiKey ? [`openai-insecure-api-key.${state.apiKey}`] : [])];
    const ws = new WebSocket(url, protocols);
    ws.binaryType = "arraybuffer";
    voice.ws = ws;
    ws.onmessage = (e) => {
      const event = JSON.parse(e.data);
      if (event.type === "session.created") {
        voice.outRate = event.session.output_sample_rate;
        resolve();
      }
      onVoiceEvent(event);
    };
    ws.onclose = (e) => {
      if (voice.ws === ws) endVoice();
      reject(new Error(e.code === 1008 && !state.apiKey ? "this server needs an API key" : `closed (${e.code})`));
      if (e.code === 1008 && !state.apiKey) askForKey("This server needs an API key.", null);
    };
  });
  return voice.ready;
}

function endVoice() {
  // The conversation is over (New chat, or the server closed it): the socket and the microphone close.
  const ws = voice.ws;
  voice.ws = null;
  voice.ready = null;
  voice.open = 0;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close();
  stopPlayback();
  stopCapture();
  setTalking(false);
}

async function startCapture() {
  if (voice.processor) return;
  voice.mic = await navigator.mediaDevices.getUserMedia(
    {audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true}});
  voice.source = voice.ctx.createMediaStreamSource(voice.mic);
  voice.processor = voice.ctx.createScriptProcessor(4096, 1, 1);  // (an AudioWorklet would need a script file)
  voice.phase = 0;
  voice.last = 0;
  voice.processor.onaudioprocess = (e) => sendAudio(e.inputBuffer.getChannelData(0));
  voice.source.connect(voice.processor);
  voice.processor.connect(voice.ctx.destination);  // (it writes silence: a processor runs only when connected)
}

function stopCapture() {
  if (!voice.processor) return;
  voice.processor.onaudioprocess = null;
  voice.source.disconnect();
  voice.processor.disconnect();
  for (const track of voice.mic.getTracks()) track.stop();
  voice.mic = voice.source = voice.processor = null;
}

function toPcm16(input, rate) {
  // The context's rate -> 16 kHz by linear interpolation; the buffer starts with the previous block's last sample.
  const step = rate / VOICE_RATE;
  const out = new Int16Array(Math.max(0, Math.ceil((input.length - voice.phase) / step)));
  let t = voice.phase;
  let n = 0;
  while (t < input.length && n < out.length) {
    const i = Math.floor(t);
    const a = i === 0 ? voice.last : input[i - 1];
    const x = a + (input[i] - a) * (t - i);
    out[n++] = Math.max(-1, Math.min(1, x)) * 32767;
    t += step;
  }
  voice.phase = t - input.length;
  voice.last = input[input.length - 1];
  return out.subarray(0, n);
}

function sendAudio(samples) {
  const pcm = toPcm16(samples, voice.ctx.sampleRate);
  if (!voice.talking) pcm.fill(0);  // off: silence keeps the server's clock (the end of turn, the answer's pace)
  if (voice.ws && voice.ws.readyState === WebSocket.OPEN) voice.ws.send(pcm.buffer.slice(pcm.byteOffset,
    pcm.byteOffset + pcm.byteLength));
  if (!voice.talking && voice.open <= 0 && performance.now() - voice.releasedAt > SILENCE_MS) stopCapture();
}

function playAudio(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer);
  if (!pcm.length) return;
  const buffer = voice.ctx.createBuffer(1, pcm.length, voice.outRate);
  const channel = buffer.getChannelData(0);
  let peak = 0;
  for (let i = 0; i < pcm.length; i++) {
    channel[i] = pcm[i] / 32768;
    peak = Math.max(peak, Math.abs(pcm[i]));
  }
  const source = voice.ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(voice.ctx.destination);
  const at = Math.max(voice.ctx.currentTime + 0.05, voice.playAt);  // one after the other, as they came
  source.start(at);
  voice.playAt = at + buffer.duration;
  voice.playing.push(source);
  source.onended = () => { voice.playing = voice.playing.filter((s) => s !== source); };
  if (voice.answer) {  // what was played, for the curious (and the tests)
    const view = voice.answer;
    view.dataset.audioSeconds = (Number(view.dataset.audioSeconds || 0) + buffer.duration).toFixed(3);
    view.dataset.audioPeak = Math.max(Number(view.dataset.audioPeak || 0), peak);
  }
}

function stopPlayback() {
  for (const source of voice.playing) source.stop();
  voice.playing = [];
  voice.playAt = 0;
}

function onVoiceEvent(event) {
  switch (event.type) {
    case "input_audio_buffer.speech_started":
      voice.open += 1;
      stopPlayback();  // a barge-in: the server cancels the answer, and what is queued here stops
      $("voice-status").textContent = "Hearing you…";
      break;
    case "input_audio_buffer.speech_stopped":
      $("voice-status").textContent = "Thinking…";
      break;
    case "conversation.item.input_audio_transcription.completed": {
      if (!event.transcript) break;
      const user = addMessage("user");
      user.dataset.voice = "1";
      renderUser(user, event.transcript, []);
      voice.said = event.transcript;
      voice.answer = addMessage("assistant");
      voice.answer.dataset.voice = "1";
      voice.answer.dataset.status = "streaming";
      voice.answerText = "";
      break;
    }
    case "response.audio_transcript.delta":
      if (!voice.answer) break;
      voice.answerText += (voice.answerText ? " " : "") + event.delta;
      renderAnswer(voice.answer, voice.answerText, false);
      voice.answer.scrollIntoView({block: "end"});
      break;
    case "response.audio.delta":
      playAudio(event.delta);
      $("voice-status").textContent = "Speaking…";
      break;
    case "response.done": {
      voice.open = Math.max(0, voice.open - 1);
      const view = voice.answer;
      voice.answer = null;
      $("voice-status").textContent = "";
      if (!view) break;
      const heard = event.response.output_transcript || "";
      renderAnswer(view, heard, true);
      const cancelled = event.response.status === "cancelled";
      if (cancelled) view.querySelector(".body").append(el("div", {class: "muted", text: "(interrupted)"}));
      view.dataset.status = cancelled ? "stopped" : "done";
      if (heard) {  // typed turns that follow see the spoken ones (the voice conversation is the server's)
        state.history.push({role: "user", content: voice.said}, {role: "assistant", content: heard});
      }
      break;
    }
    case "error":
      setStatus(`Voice: ${event.error.message}`);
      break;
  }
}

function setTalking(on) {
  voice.talking = on;
  $("talk").setAttribute("aria-pressed", on ? "true" : "false");
  $("talk").textContent = on ? "Listening…" : "Talk";
  if (!on) voice.releasedAt = performance.now();
}

async function talkDown(e) {
  e.preventDefault();
  if ($("talk").disabled) return;
  if (voice.talking) return setTalking(false);  // a click while on: off
  voice.held = true;
  voice.pressedAt = performance.now();
  setTalking(true);
  try {
    voice.ctx = voice.ctx || new AudioContext();  // made in the click: the browser lets it play
    await voice.ctx.resume();
    await openVoice();
    await startCapture();
  } catch (err) {
    setTalking(false);
    setStatus(`Voice: ${err.message}`);
  }
}

function talkUp() {
  if (!voice.held) return;
  voice.held = false;
  if (performance.now() - voice.pressedAt >= HOLD_MS) setTalking(false);  // held: push-to-talk; a click stays on
}

// ------------------------------------------------------------------------------------------------ wiring
$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("model").addEventListener("change", updateModel);
$("new-chat").addEventListener("click", newChat);
$("attach-image").addEventListener("click", () => $("image-input").click());
$("attach-audio").addEventListener("click", () => $("audio-input").click());
$("attach-video").addEventListener("click", () => $("video-input").click());
for (const id of ["image-input", "audio-input", "video-input"]) {
  $(id).addEventListener("change", async (e) => { await addFiles([...e.target.files]); e.target.value = ""; });
}
document.addEventListener("paste", (e) => {  // images from the clipboard
  const files = [...((e.clipboardData && e.clipboardData.files) || [])].filter((f) => f.type.startsWith("image/"));
  if (files.length) {
    e.preventDefault();
    addFiles(files);
  }
});
$("chat").addEventListener("dragover", (e) => { e.preventDefault(); $("chat").classList.add("dropping"); });
$("chat").addEventListener("dragleave", () => $("chat").classList.remove("dropping"));
$("chat").addEventListener("drop", (e) => {
  e.preventDefault();
  $("chat").classList.remove("dropping");
  addFiles([...e.dataTransfer.files]);
});
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.apiKey = $("api-key").value.trim();
  sessionStorage.setItem("polymodal.apiKey", state.apiKey);  // this tab only, gone when it closes
  $("key-form").hidden = true;
  const retry = state.retry;
  state.retry = null;
  if (retry) retry();
});
$("imagegen-form").addEventListener("submit", generateImage);
$("image-model").addEventListener("change", updateImageModel);
$("talk").addEventListener("pointerdown", talkDown);
$("talk").addEventListener("pointerup", talkUp);
$("talk").addEventListener("pointerleave", talkUp);
$("talk").addEventListener("keydown", (e) => {  // Space or Enter: held, push-to-talk; pressed, a toggle
  if ((e.key === " " || e.key === "Enter") && !e.repeat) talkDown(e);
});
$("talk").addEventListener("keyup", (e) => { if (e.key === " " || e.key === "Enter") talkUp(); });
$("talk").addEventListener("click", (e) => e.preventDefault());  // (handled on pointerdown and keydown)

loadModels();
