// roomgate chat demo: one room at a time over the gateway's WebSocket.
//
// The page is served by the upstream app through roomgate's proxy and
// opens its WebSocket to roomgate's /ws on the same host, so it works
// unchanged behind any port, host or TLS terminator.
//
// What travels (roomgate's client protocol):
//   out: {"type":"join"|"leave","room":R,"id":I}
//        {"type":"message","room":R,"content":{"name":N,"text":T},"id":I}
//   in:  system (our connection id), joined, left, message, presence, ack, error
//
// The gateway does not send our own messages back to us, so the page shows
// them at once, greyed out until the gateway's ack for their id arrives.
//
// The state of the page is mirrored in data attributes (body[data-state],
// body[data-connection-id], li[data-id]) for the end-to-end test.

"use strict";

const MAX_LOG_LINES = 500;
const ROOM_NAME = /^[A-Za-z0-9_\-:@=]+(\.[A-Za-z0-9_\-:@=]+)*$/;

const $ = (id) => document.getElementById(id);

const state = {
  ws: null,
  // Our connection id, from the gateway's welcome frame.
  me: null,
  // The room we are in (after "joined"), and the one we want to be in
  // (joined again after a reconnect).
  room: null,
  wanted: null,
  // Other members we know of: connection id -> display name or null.
  // The protocol lists no members; we learn them from presence frames and
  // from the messages they send.
  members: new Map(),
  // Our messages awaiting their ack: frame id -> log line.
  pending: new Map(),
  nextId: 1,
  // Consecutive failed connection attempts, for the back-off.
  failures: 0,
};

// ----- connection -------------------------------------------------------

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

function connect() {
  setState("connecting");
  const ws = new WebSocket(wsUrl());
  state.ws = ws;
  ws.onmessage = (event) => {
    if (state.ws === ws) onFrame(event.data);
  };
  ws.onclose = (event) => {
    if (state.ws === ws) onClose(event);
  };
}

function onClose(event) {
  state.ws = null;
  state.me = null;
  state.room = null;
  state.members.clear();
  for (const line of state.pending.values()) fail(line);
  state.pending.clear();
  setState("offline");
  renderMembers();
  // 1013: the gateway shed us as a slow consumer; 1001: it is shutting
  // down. Either way, come back later, and a bit later each time.
  const delay = Math.min(15000, 500 * 2 ** state.failures) * (0.5 + Math.random());
  state.failures += 1;
  logLine("system", null, `Disconnected (${event.code || "no close code"}); reconnecting in ${Math.round(delay / 1000)} s`);
  setTimeout(connect, delay);
}

function send(frame) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(frame));
  return true;
}

function frameId() {
  const id = `f${state.nextId}`;
  state.nextId += 1;
  return id;
}

// ----- frames from the gateway ----------------------------------------

function onFrame(data) {
  let frame;
  try {
    frame = JSON.parse(data);
  } catch {
    logLine("error", null, "unreadable frame from the gateway");
    return;
  }
  switch (frame.type) {
    case "system":
      state.me = frame.connection_id || null;
      state.failures = 0;
      $("me").textContent = state.me || "unknown";
      document.body.dataset.connectionId = state.me || "";
      setState("connected");
      if (state.wanted) send({ type: "join", room: state.wanted, id: frameId() });
      break;
    case "joined":
      state.room = frame.room;
      state.wanted = frame.room;
      state.members.clear();
      setState("joined");
      logLine("system", null, `You joined ${frame.room}`);
      renderMembers();
      break;
    case "left":
      if (frame.room !== state.room) break;
      state.room = null;
      state.wanted = null;
      state.members.clear();
      setState("connected");
      logLine("system", null, frame.reason === "kicked" ? `You were removed from ${frame.room}` : `You left ${frame.room}`);
      renderMembers();
      break;
    case "message":
      onMessage(frame);
      break;
    case "presence":
      onPresence(frame);
      break;
    case "ack": {
      const line = state.pending.get(frame.id);
      if (line) line.classList.remove("pending");
      state.pending.delete(frame.id);
      break;
    }
    case "error": {
      const line = state.pending.get(frame.id);
      if (line) fail(line);
      state.pending.delete(frame.id);
      logLine("error", null, `${frame.code}: ${frame.message}`);
      break;
    }
    default:
      break;
  }
}

function onMessage(frame) {
  // A message for a room we already left may still be in flight.
  if (frame.room !== null && frame.room !== undefined && frame.room !== state.room) return;
  const { name, text } = readContent(frame.content);
  const from = typeof frame.from === "string" ? frame.from : "server";
  const isMember = from !== state.me && (state.members.has(from) || looksLikeConnectionId(from));
  if (isMember && frame.room) {
    state.members.set(from, name);
    renderMembers();
  }
  const who = name || (isMember ? shortId(from) : from);
  const line = logLine(frame.room ? "message" : "message direct", who, text);
  line.dataset.from = from;
}

function onPresence(frame) {
  if (frame.room !== state.room || frame.connection_id === state.me) return;
  const id = frame.connection_id;
  const known = state.members.get(id) || frame.user || shortId(id);
  if (frame.event === "join") {
    if (!state.members.has(id)) state.members.set(id, frame.user || null);
    logLine("presence", null, `${known} joined`);
  } else if (frame.event === "leave") {
    state.members.delete(id);
    logLine("presence", null, `${known} left`);
  }
  renderMembers();
}

// Members send {"name","text"}. A backend's payload arrives as text, which
// may itself be JSON of that shape; anything else is shown as it is.
function readContent(content) {
  let value = content;
  if (typeof value === "string") {
    try {
      const parsed = JSON.parse(value);
      if (parsed && typeof parsed === "object") value = parsed;
    } catch {
      // plain text
    }
  }
  if (value && typeof value === "object" && !Array.isArray(value) && typeof value.text === "string") {
    return { name: typeof value.name === "string" ? value.name.slice(0, 32) : null, text: value.text };
  }
  return { name: null, text: typeof value === "string" ? value : JSON.stringify(value) };
}

function looksLikeConnectionId(text) {
  return /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(text);
}

function shortId(id) {
  return typeof id === "string" ? id.slice(0, 8) : "someone";
}

// ----- what the user does ---------------------------------------------

function myName() {
  return $("name").value.trim().slice(0, 32) || "guest";
}

function onJoin(event) {
  event.preventDefault();
  const room = $("room").value.trim();
  if (new TextEncoder().encode(room).length > 128 || !ROOM_NAME.test(room)) {
    logLine("error", null, "A room name is letters, digits and _ - : @ =, in tokens separated by dots");
    return;
  }
  if (state.room === room) return;
  if (state.room) send({ type: "leave", room: state.room, id: frameId() });
  state.wanted = room;
  send({ type: "join", room, id: frameId() });
}

function onLeave() {
  if (state.room) send({ type: "leave", room: state.room, id: frameId() });
  state.wanted = null;
}

function onSend(event) {
  event.preventDefault();
  const input = $("text");
  const text = input.value.trim();
  if (!text || !state.room) return;
  const id = frameId();
  const sent = send({ type: "message", room: state.room, content: { name: myName(), text }, id });
  const line = logLine("message mine pending", myName(), text);
  if (sent) state.pending.set(id, line);
  else fail(line);
  input.value = "";
  input.focus();
}

// ----- rendering --------------------------------------------------------

function setState(name) {
  document.body.dataset.state = name;
  $("status").textContent = name === "joined" ? `in ${state.room}` : name;
  const joined = name === "joined";
  $("text").disabled = !joined;
  $("send").disabled = !joined;
  $("leave").disabled = !joined;
  $("room-name").textContent = joined ? state.room : "no room";
}

function logLine(kind, who, text) {
  const log = $("log");
  const line = document.createElement("li");
  line.className = kind;
  if (who !== null) {
    const name = document.createElement("span");
    name.className = "who";
    name.textContent = who;
    line.append(name);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  line.append(body, time);
  log.append(line);
  while (log.children.length > MAX_LOG_LINES) log.firstElementChild.remove();
  log.scrollTop = log.scrollHeight;
  return line;
}

function fail(line) {
  line.classList.remove("pending");
  line.classList.add("failed");
}

function renderMembers() {
  const list = $("members");
  list.replaceChildren();
  if (!state.room) return;
  const self = document.createElement("li");
  self.className = "self";
  self.dataset.id = state.me || "";
  self.textContent = `${myName()} (you)`;
  list.append(self);
  for (const [id, name] of state.members) {
    const item = document.createElement("li");
    item.dataset.id = id;
    item.textContent = name || shortId(id);
    item.title = id;
    list.append(item);
  }
}

// ----- start ------------------------------------------------------------

function start() {
  const params = new URLSearchParams(location.search);
  $("name").value = params.get("name") || `guest-${Math.random().toString(36).slice(2, 6)}`;
  $("room").value = params.get("room") || "general";
  $("join-form").addEventListener("submit", onJoin);
  $("leave").addEventListener("click", onLeave);
  $("send-form").addEventListener("submit", onSend);
  $("name").addEventListener("change", renderMembers);
  connect();
}

start();
