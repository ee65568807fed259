// The review page of `python -m app.clean`. Vanilla JS, no build step. Every file name and label
// comes from the data folder (often from the internet): always inserted with textContent.
"use strict";

const SELECT_ABOVE = 4; // more classes than this: "Move to" is a select, not one button per class
const state = { classes: [], items: [], cards: new Map(), busy: false };
// The token app.clean printed in the page's link: every request for data carries it.
const TOKEN = new URLSearchParams(window.location.search).get("token") || "";
// $ and el come from dom.js.

function withToken(path) {
  return `${path}?token=${encodeURIComponent(TOKEN)}`;
}

function percent(p) {
  return p === null || p === undefined ? "" : `${Math.round(p * 100)}%`;
}

function describeDecision(item) {
  if (item.decision === "keep") return "Kept";
  if (item.decision === "accept") return `Accepted into ${item.moved_to}`;
  if (item.decision === "reject") return "Rejected (moved to _rejected)";
  if (item.decision === "move") return `Moved to ${item.moved_to}`;
  if (item.decision === "unfamiliar") return "Moved to _unfamiliar (none of the classes)";
  return "";
}

function showProgress(p) {
  const accepted = p.incoming ? ` · ${p.accepted} accepted` : "";
  $("progress").textContent = `Reviewed ${p.reviewed} of ${p.total}${accepted} · ${p.kept} kept · ${p.moved} moved · ` +
    `${p.rejected} rejected · ${p.unfamiliar} none of these`;
  $("flagged").textContent = `${p.flagged} of ${p.total} photos flagged as mislabeled, out of place or unreadable; ` +
    "they come first.";
}

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

// --- Cards -----------------------------------------------------------------------------------

function renderCard(item) {
  const card = el("li", "review-card");
  card.tabIndex = 0;
  card.dataset.id = item.id;
  const link = el("a");
  link.href = withToken(`/photo/${item.id}`);
  link.target = "_blank";
  link.rel = "noopener";
  const img = el("img", "thumb");
  img.loading = "lazy";
  img.decoding = "async";
  img.alt = `Photo ${item.file}`;
  img.src = withToken(`/thumb/${item.id}`);
  link.append(img);
  const body = el("div", "card-body");
  card.append(link, body);
  fillCard(card, item);
  card.addEventListener("focus", () => { state.current = item.id; });
  return card;
}

function fillCard(card, item) {
  const body = card.querySelector(".card-body");
  body.replaceChildren();
  body.append(el("p", "file-name", item.file));
  const labels = el("p", "labels");
  if (item.incoming) {
    card.classList.add("incoming");
    labels.append(el("span", "", `Parent says: ${item.label} · model said: ${item.predicted} ` +
      `(${percent(item.predicted_prob)})`));
  } else {
    labels.append(el("span", "", `Folder: ${folderNow(item)}`));
    if (item.predicted) labels.append(el("span", "", ` · looks like: ${item.predicted} (${percent(item.predicted_prob)})`));
  }
  body.append(labels, el("p", "why", item.reason));
  card.classList.toggle("decided", Boolean(item.decision));
  card.classList.toggle("reject", item.decision === "reject");
  if (item.decision) body.append(el("p", "decision", describeDecision(item)));
  const actions = el("div", "actions");
  const accepts = item.incoming && state.classes.includes(item.label) ? `Accept as ${item.label}` : "Accept";
  const keep = el("button", "button", item.incoming ? `${accepts} (K)` : "Keep");
  keep.type = "button";
  keep.addEventListener("click", () => decide(item.id, "keep"));
  const reject = el("button", "button", "Reject");
  reject.type = "button";
  reject.addEventListener("click", () => decide(item.id, "reject"));
  const none = el("button", "button", "None of these (N)");
  none.type = "button";
  none.addEventListener("click", () => decide(item.id, "unfamiliar"));
  actions.append(keep, reject, none);
  const others = state.classes.map((c, i) => [c, i]).filter(([c]) => c !== currentClass(item));
  if (state.classes.length > SELECT_ABOVE) {
    const select = el("select");
    select.setAttribute("aria-label", `Move ${item.file} to class`);
    for (const [c] of others) select.append(new Option(c, c));
    const move = el("button", "button", "Move");
    move.type = "button";
    move.addEventListener("click", () => decide(item.id, "move", select.value));
    actions.append(select, move);
  } else {
    for (const [c, i] of others) {
      const move = el("button", "button", `Move to ${c} (${i + 1})`);
      move.type = "button";
      move.addEventListener("click", () => decide(item.id, "move", c));
      actions.append(move);
    }
  }
  body.append(actions);
}

// Where the photo is now, and where it was scored if that differs.
function folderNow(item) {
  const now = item.decision === "reject" ? "_rejected" : currentClass(item) || item.label;
  return now === item.label ? now : `${now} (was ${item.label})`;
}

function currentClass(item) {
  const folder = item.file.split("/")[0];
  return state.classes.includes(folder) ? folder : null;
}

function update(item) {
  const index = state.items.findIndex((i) => i.id === item.id);
  state.items[index] = item;
  fillCard(state.cards.get(item.id), item);
}

// --- Talking to the server -------------------------------------------------------------------

async function post(path, body) {
  const resp = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Review-Token": TOKEN },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error((data.error && data.error.message) || `HTTP ${resp.status}`);
  return data;
}

async function act(request) {
  if (state.busy) return null;
  state.busy = true;
  try {
    const result = await request();
    showMessage("");
    update(result.item);
    showProgress(result.progress);
    $("undo-button").disabled = false;
    return result.item;
  } catch (err) {
    showMessage(err.message);
    return null;
  } finally {
    state.busy = false;
  }
}

async function decide(id, action, to) {
  const item = await act(() => post("/api/decide", { id, action, to }));
  if (item) focusAfter(id);
}

async function undo() {
  const item = await act(() => post("/api/undo"));
  if (item) state.cards.get(item.id).focus();
}

// --- Keyboard --------------------------------------------------------------------------------

function focusedId() {
  const card = document.activeElement && document.activeElement.closest(".review-card");
  return card ? Number(card.dataset.id) : null;
}

// After a decision: the next photo not decided yet (or simply the next one).
function focusAfter(id) {
  const index = state.items.findIndex((i) => i.id === id);
  const next = state.items.slice(index + 1).find((i) => !i.decision) || state.items[index + 1];
  if (next) state.cards.get(next.id).focus();
}

function step(id, delta) {
  const index = id === null ? (delta > 0 ? -1 : 0) : state.items.findIndex((i) => i.id === id);
  const target = state.items[Math.max(0, Math.min(state.items.length - 1, index + delta))];
  if (target) state.cards.get(target.id).focus();
}

function onKey(event) {
  if (event.ctrlKey && event.key.toLowerCase() === "z") {
    event.preventDefault();
    undo();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey || event.target.tagName === "SELECT") return;
  const key = event.key.toLowerCase();
  const id = focusedId();
  if (key === "u") undo();
  else if (key === "arrowdown" || key === "j") step(id, 1);
  else if (key === "arrowup" || key === "p") step(id, -1);
  else if (id === null) return;
  else if (key === "k") decide(id, "keep");
  else if (key === "r" || key === "delete") decide(id, "reject");
  else if (key === "n") decide(id, "unfamiliar");
  else if (key === "o") window.open(withToken(`/photo/${id}`), "_blank", "noopener");
  else if (/^[1-9]$/.test(key) && state.classes[Number(key) - 1]) decide(id, "move", state.classes[Number(key) - 1]);
  else return;
  event.preventDefault();
}

// --- Start -----------------------------------------------------------------------------------

async function init() {
  const resp = await fetch("/api/items", { headers: { "X-Review-Token": TOKEN } });
  const data = await resp.json();
  if (!resp.ok) {
    showMessage((data.error && data.error.message) || `HTTP ${resp.status}`);
    $("progress").textContent = "";
    return;
  }
  state.classes = data.classes;
  state.items = data.items;
  const incoming = data.incoming ? `corrections sent from the page (${data.incoming}) first, then ` : "";
  $("folder").textContent = `${data.data}: ${incoming}most suspicious first (classes: ${data.classes.join(", ")}).`;
  const list = $("items");
  const fragment = document.createDocumentFragment();
  for (const item of data.items) {
    const card = renderCard(item);
    state.cards.set(item.id, card);
    fragment.append(card);
  }
  list.append(fragment);
  showProgress(data.progress);
  $("undo-button").disabled = data.progress.reviewed === 0;
  $("undo-button").addEventListener("click", undo);
  document.addEventListener("keydown", onKey);
  const first = data.items.find((i) => !i.decision) || data.items[0];
  if (first) state.cards.get(first.id).focus();
}

init();
