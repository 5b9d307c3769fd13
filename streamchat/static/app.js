// streamchat in the browser: camera (or a video file) -> MediaRecorder WebM -> video.chunk
// messages over one WebSocket session; questions in, answers streamed back token by token.
// The wire protocol is docs/protocol.md (JSON text frames, byte fields in base64).
"use strict";

const MIME_TYPES = ["video/webm;codecs=vp8", "video/webm;codecs=vp9", "video/webm"];
const TIMESLICE_MS = 400; // one chunk about every 400 ms
const JSON_OVERHEAD = 256; // room for {"type":"video.chunk","format":"webm","data":""}

const ERROR_WORDS = {
  no_frames: "No video yet — start the camera first (or stream a video file), then ask again.",
  too_many_asks: "Too many questions at once — wait for an answer to finish, or cancel one.",
  duplicate_id: "That question was sent twice — please ask again.",
  unknown_id: "That answer had already finished.",
  message_too_large: "A piece of video was too large for the server. Try again; if it keeps " +
    "happening, use a lower resolution.",
  video_decode_failed: "The server could not decode the video (the data looked damaged). " +
    "Stop the video and start it again.",
  video_unsupported: "The server cannot decode this kind of video. Use the camera, or a WebM " +
    "or MP4 file.",
  video_too_large: "The video's pictures are larger than the server accepts. Use a lower " +
    "resolution.",
  video_timeout: "The server received no video for a while and ended the stream. Start the " +
    "video again.",
  video_backlog_full: "The server is behind with decoding, so a piece of video was dropped. " +
    "It catches up by itself; a lower resolution helps.",
  source_busy: "The server is still playing another video source. Stop it first.",
  engine_error: "The model failed while answering. Try asking again.",
  rate_limited: "Too many messages too fast — the server dropped one. Slow down a little.",
  video_too_long: "The video is longer than the server accepts for one source. Start it again.",
  url_not_allowed: "The server does not fetch that address.",
  url_fetch_failed: "The server could not fetch the video.",
  decoder_busy: "The server is busy decoding other videos; try again in a moment.",
  unauthorized: "This server needs an API key. Enter it above and connect again.",
  idle_timeout: "The session was closed after a long time with nothing to do. Reload the page " +
    "to start a new one.",
  server_shutdown: "The server is shutting down and takes no new questions.",
  internal_error: "Something went wrong on the server. Try again; if it keeps happening, the " +
    "server's log says more.",
};

const FINISH_WORDS = {
  stop: "Complete",
  length: "Stopped at the length limit",
  cancelled: "Cancelled",
  shutdown: "Stopped: the server shut down",
  error: "Failed",
};

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"),
  sessionInfo: $("session-info"),
  model: $("model"),
  session: $("session"),
  preview: $("preview"),
  cameraStart: $("camera-start"),
  videoStop: $("video-stop"),
  fileInput: $("file-input"),
  videoStatus: $("video-status"),
  askForm: $("ask-form"),
  question: $("question"),
  askButton: $("ask-button"),
  cancelButton: $("cancel-button"),
  answers: $("answers"),
  messages: $("messages"),
  keyForm: $("key-form"),
  key: $("api-key"),
};

// An API key, when the server needs one: typed into the page (kept for this tab only) or
// given in the address as #key=... (a fragment never reaches the server or its logs).
const KEY_STORE = "streamchat.key";
const SUBPROTOCOL = "streamchat.v1";
const KEY_PREFIX = "streamchat.key.";
const KEY_PATTERN = /^[A-Za-z0-9._~-]+$/; // what a subprotocol may carry

let socket = null;
let limits = null; // from `ready`
let recording = null; // {recorder, stream, first, queue, stopTracks}
let askCounter = 0;
const answers = new Map(); // id -> {article, text, meta, inFlight}

// ---- messages for people -------------------------------------------------------------------

function say(text, { kind = "error" } = {}) {
  const item = document.createElement("p");
  item.className = `message ${kind}`;
  item.textContent = text;
  const close = document.createElement("button");
  close.type = "button";
  close.className = "dismiss";
  close.setAttribute("aria-label", "Dismiss message");
  close.textContent = "×";
  close.addEventListener("click", () => item.remove());
  item.append(close);
  ui.messages.append(item);
  // Keep only the latest few messages on screen.
  while (ui.messages.childElementCount > 4) ui.messages.firstElementChild.remove();
}

function setConnection(state, text) {
  ui.connection.dataset.state = state;
  ui.connection.textContent = text;
}

// ---- the session ---------------------------------------------------------------------------

function sessionUrl() {
  const url = new URL("v1/session", window.location.href);
  url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function send(message) {
  if (!socket || socket.readyState !== WebSocket.OPEN) return false;
  socket.send(JSON.stringify(message));
  return true;
}

function apiKey() {
  const fromAddress = new URLSearchParams(window.location.hash.slice(1)).get("key");
  if (fromAddress) {
    sessionStorage.setItem(KEY_STORE, fromAddress);
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  return sessionStorage.getItem(KEY_STORE);
}

function askForKey(text) {
  ui.keyForm.hidden = false;
  ui.key.focus();
  say(text);
}

function connect() {
  setConnection("connecting", "Connecting to the server…");
  const key = apiKey();
  // Browsers cannot set headers on a WebSocket: the key travels as a subprotocol.
  const protocols = key ? [SUBPROTOCOL, KEY_PREFIX + key] : [SUBPROTOCOL];
  let opened = false;
  const ws = new WebSocket(sessionUrl(), protocols);
  socket = ws;
  ws.addEventListener("open", () => {
    opened = true;
    send({ type: "hello" });
  });
  ws.addEventListener("message", (event) => {
    if (typeof event.data !== "string") return; // we speak JSON, so the server does too
    handle(JSON.parse(event.data));
  });
  ws.addEventListener("close", (event) => {
    if (socket !== ws) return; // an earlier connection, replaced on purpose
    const wasReady = limits !== null;
    limits = null;
    socket = null;
    stopVideo({ tellServer: false });
    setReady(false);
    for (const [id, answer] of answers) {
      if (answer.inFlight) finishAnswer(id, "error", null, "The connection closed.");
    }
    setConnection("closed", "Disconnected");
    if (event.code === CLOSE_UNAUTHORIZED) return; // the error already asked for a key
    if (!opened && key) {
      // A refused handshake looks the same as a dead server to a page; a wrong key is likelier.
      askForKey("The server refused the connection: check the API key, then connect again.");
      return;
    }
    if (event.code === CLOSE_GOING_AWAY || event.code === CLOSE_IDLE) {
      say("The session has ended. Reload the page to start a new one.", { kind: "info" });
      return;
    }
    const why = wasReady
      ? `The connection to the server was lost (code ${event.code}).`
      : "Could not connect to the server (it may be full, or not running).";
    say(`${why} Reload the page to start a new session.`);
  });
}

const CLOSE_GOING_AWAY = 1001;
const CLOSE_UNAUTHORIZED = 4401;
const CLOSE_IDLE = 4408;

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = ui.key.value.trim();
  if (!KEY_PATTERN.test(key)) {
    say("An API key is made of letters, digits and . _ ~ - only.");
    return;
  }
  sessionStorage.setItem(KEY_STORE, key);
  ui.key.value = "";
  ui.keyForm.hidden = true;
  if (socket) socket.close();
  connect();
});

function setReady(ready) {
  ui.question.disabled = !ready;
  ui.askButton.disabled = !ready;
  ui.cameraStart.disabled = !ready || recording !== null;
  ui.fileInput.disabled = !ready || recording !== null;
  ui.videoStop.disabled = recording === null;
  updateCancel();
}

function handle(message) {
  switch (message.type) {
    case "ready":
      limits = message.limits;
      ui.model.textContent = message.model;
      ui.session.textContent = message.session;
      ui.sessionInfo.hidden = false;
      setConnection("ready", "Connected");
      setReady(true);
      break;
    case "video.status":
      showStatus(message);
      break;
    case "answer.delta":
      appendDelta(message.id, message.text);
      break;
    case "answer.done":
      finishAnswer(message.id, message.finish_reason, message.usage, null);
      break;
    case "error":
      if (message.code === "unauthorized") {
        sessionStorage.removeItem(KEY_STORE);
        askForKey(ERROR_WORDS.unauthorized);
        break;
      }
      showError(message);
      break;
    case "going_away":
      say(`The server is shutting down: answers in progress get ${message.timeout} s to ` +
        "finish. Reload the page in a moment to start a new session.", { kind: "info" });
      break;
    default:
      break; // later protocol versions may add messages
  }
}

function showError(message) {
  const words = ERROR_WORDS[message.code] || `The server refused a message: ${message.message}`;
  if (message.code === "unknown_id") return; // a cancel raced the end of its answer: harmless
  const answer = message.id ? answers.get(message.id) : undefined;
  if (answer && answer.inFlight && message.code !== "engine_error") {
    // The ask was refused, so no answer.done follows: end it here.
    finishAnswer(message.id, "error", null, words);
  }
  say(words);
  if (message.fatal) say("The server is closing this session.");
}

function showStatus(status) {
  ui.videoStatus.dataset.frames = String(status.frames);
  ui.videoStatus.dataset.state = status.state;
  const state = { decoding: "Receiving", ended: "Ended", failed: "Failed" }[status.state] ||
    status.state;
  ui.videoStatus.textContent =
    `${state} · ${status.frames} frames buffered · ${status.span.toFixed(1)} s span · ` +
    `decode lag ${status.decode_lag.toFixed(2)} s`;
}

// ---- questions and answers -----------------------------------------------------------------

function newAskId() {
  askCounter += 1;
  return `q${askCounter}-${Date.now().toString(36)}`;
}

function ask(text) {
  const id = newAskId();
  const article = document.createElement("li");
  article.className = "answer";
  article.dataset.id = id;
  article.dataset.state = "streaming";
  article.setAttribute("aria-busy", "true"); // read out once complete, not token by token
  const question = document.createElement("p");
  question.className = "answer-question";
  question.textContent = text;
  const body = document.createElement("p");
  body.className = "answer-text";
  const meta = document.createElement("p");
  meta.className = "answer-meta";
  meta.textContent = "Thinking…";
  article.append(question, body, meta);
  ui.answers.prepend(article);
  answers.set(id, { article, body, meta, inFlight: true });
  if (!send({ type: "ask", id, text })) finishAnswer(id, "error", null, "Not connected.");
  updateCancel();
}

function appendDelta(id, text) {
  const answer = answers.get(id);
  if (!answer) return;
  answer.body.textContent += text;
  answer.meta.textContent = "Answering…";
}

function finishAnswer(id, reason, usage, problem) {
  const answer = answers.get(id);
  if (!answer || !answer.inFlight) return;
  answer.inFlight = false;
  answer.article.dataset.state = "done";
  answer.article.removeAttribute("aria-busy");
  answer.article.dataset.finish = reason;
  const parts = [FINISH_WORDS[reason] || reason];
  if (problem) parts.push(problem);
  if (usage) {
    parts.push(`${usage.completion_tokens} tokens`, `${usage.frames} frames seen`);
    if (usage.time_to_first_token !== null) {
      parts.push(`first token after ${usage.time_to_first_token.toFixed(2)} s`);
    }
  }
  answer.meta.textContent = parts.join(" · ");
  updateCancel();
}

function inFlight() {
  // Newest first, as shown on the page.
  return [...answers.entries()].reverse().find(([, answer]) => answer.inFlight);
}

function updateCancel() {
  ui.cancelButton.disabled = socket === null || inFlight() === undefined;
}

ui.askForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.question.value.trim();
  if (!text) return;
  ask(text);
  ui.question.value = "";
});

ui.cancelButton.addEventListener("click", () => {
  const latest = inFlight();
  if (latest) send({ type: "cancel", id: latest[0] });
});

// ---- video: camera or file -> MediaRecorder -> video.chunk ---------------------------------

function pickMimeType() {
  if (typeof MediaRecorder === "undefined") return null;
  return MIME_TYPES.find((type) => MediaRecorder.isTypeSupported(type)) || null;
}

function base64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function maxChunkBytes() {
  // base64 turns 3 bytes into 4 characters; leave room for the rest of the JSON.
  const budget = Math.max(limits.max_message_bytes - JSON_OVERHEAD, 4);
  return Math.floor(budget / 4) * 3;
}

function pushBytes(rec, bytes) {
  const size = maxChunkBytes();
  for (let at = 0; at < bytes.length; at += size) {
    const message = { type: "video.chunk", data: base64(bytes.subarray(at, at + size)) };
    if (rec.first) {
      message.format = "webm";
      rec.first = false;
    }
    if (!send(message)) return;
  }
}

function startRecording(stream, { stopTracks }) {
  const mimeType = pickMimeType();
  if (!mimeType) {
    if (stopTracks) stream.getTracks().forEach((track) => track.stop());
    say("This browser cannot record WebM video (MediaRecorder supports none of VP8, VP9 or " +
      "WebM), so it cannot stream to the server. Use a recent Chrome, Edge or Firefox.");
    return false;
  }
  const video = new MediaStream(stream.getVideoTracks()); // the server wants no audio
  let recorder;
  try {
    recorder = new MediaRecorder(video, { mimeType });
  } catch (error) {
    if (stopTracks) stream.getTracks().forEach((track) => track.stop());
    say(`This browser cannot record this video as ${mimeType} (${error.message}).`);
    return false;
  }
  // Blobs are read asynchronously: a promise chain keeps the chunks in recording order.
  const rec = { recorder, stream, stopTracks, first: true, queue: Promise.resolve() };
  recorder.addEventListener("dataavailable", (event) => {
    if (!event.data || event.data.size === 0) return;
    rec.queue = rec.queue.then(async () => {
      const bytes = new Uint8Array(await event.data.arrayBuffer());
      if (recording === rec) pushBytes(rec, bytes);
    });
  });
  recorder.addEventListener("error", (event) => {
    say(`Recording stopped: ${event.error ? event.error.message : "the recorder failed"}.`);
    stopVideo({ tellServer: true });
  });
  recording = rec;
  recorder.start(TIMESLICE_MS);
  setReady(limits !== null);
  return true;
}

function stopVideo({ tellServer }) {
  const rec = recording;
  if (!rec) return;
  if (rec.recorder.state !== "inactive") {
    // The last chunk arrives after stop(); send it, then tell the server the source is over.
    rec.recorder.addEventListener("stop", () => {
      rec.queue = rec.queue.then(() => {
        if (recording === rec) recording = null;
        if (tellServer) send({ type: "video.end" });
        setReady(limits !== null);
      });
    }, { once: true });
    rec.recorder.stop();
  } else {
    recording = null;
  }
  if (rec.stopTracks) rec.stream.getTracks().forEach((track) => track.stop());
  ui.preview.pause();
  ui.videoStop.disabled = true;
}

function cameraProblem(error) {
  switch (error && error.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Camera permission was denied. Allow the camera for this site (the camera icon " +
        "in the address bar), then press Start camera again — or stream a video file instead.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No camera was found. Connect a camera and press Start camera again, or stream a " +
        "video file instead.";
    case "NotReadableError":
    case "AbortError":
      return "The camera could not be started; another program may be using it. Close that " +
        "program and press Start camera again.";
    default:
      return `The camera could not be started (${error && error.message ? error.message : error}).`;
  }
}

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    say("This page cannot use the camera here: browsers allow it only on https:// or " +
      "http://localhost pages. Open the page that way, or stream a video file instead.");
    return;
  }
  if (!pickMimeType()) {
    startRecording(new MediaStream(), { stopTracks: false }); // says what is missing
    return;
  }
  ui.cameraStart.disabled = true;
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (error) {
    say(cameraProblem(error));
    setReady(limits !== null);
    return;
  }
  if (!limits) {
    stream.getTracks().forEach((track) => track.stop());
    return;
  }
  ui.preview.removeAttribute("src");
  ui.preview.srcObject = stream;
  ui.preview.play().catch(() => {});
  if (!startRecording(stream, { stopTracks: true })) ui.preview.srcObject = null;
}

// A file is played in the <video> element and re-recorded from captureStream(), so any format
// the browser can play streams to the server exactly like the camera: in real time, as WebM.
async function streamFile(file) {
  const capture = ui.preview.captureStream || ui.preview.mozCaptureStream;
  if (!capture) {
    say("This browser cannot record a playing video (no captureStream), so it cannot stream " +
      "files. Use the camera instead.");
    return;
  }
  ui.preview.srcObject = null;
  ui.preview.src = URL.createObjectURL(file);
  ui.preview.muted = true;
  try {
    await ui.preview.play();
  } catch (error) {
    say(`This browser cannot play “${file.name}”. Pick another video file.`);
    return;
  }
  const stream = capture.call(ui.preview);
  if (stream.getVideoTracks().length === 0) {
    // The tracks appear once playback has started.
    await new Promise((resolve) => stream.addEventListener("addtrack", resolve, { once: true }));
  }
  if (startRecording(stream, { stopTracks: false })) {
    ui.preview.addEventListener("ended", () => stopVideo({ tellServer: true }), { once: true });
  }
}

ui.cameraStart.addEventListener("click", () => startCamera());
ui.videoStop.addEventListener("click", () => stopVideo({ tellServer: true }));
ui.fileInput.addEventListener("change", () => {
  const file = ui.fileInput.files && ui.fileInput.files[0];
  ui.fileInput.value = "";
  if (file) streamFile(file);
});

setReady(false);
connect();
