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
  internal_error: "Something went wrong on the server. Try again; if it keeps happening, the " +
    "server's log says more.",
};

const FINISH_WORDS = {
  stop: "Complete",
  length: "Stopped at the length limit",
  cancelled: "Cancelled",
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
};

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

function connect() {
  setConnection("connecting", "Connecting to the server…");
  socket = new WebSocket(sessionUrl());
  socket.addEventListener("open", () => send({ type: "hello" }));
  socket.addEventListener("message", (event) => {
    if (typeof event.data !== "string") return; // we speak JSON, so the server does too
    handle(JSON.parse(event.data));
  });
  socket.addEventListener("close", (event) => {
    const wasReady = limits !== null;
    limits = null;
    socket = null;
    stopVideo({ tellServer: false });
    setReady(false);
    for (const [id, answer] of answers) {
      if (answer.inFlight) finishAnswer(id, "error", null, "The connection closed.");
    }
    setConnection("closed", "Disconnected");
    const why = wasReady
      ? `The connection to the server was lost (code ${event.code}).`
      : "Could not connect to the server.";
    say(`${why} Is the server still running? Reload the page to start a new session.`);
  });
}

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
      showError(message);
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
