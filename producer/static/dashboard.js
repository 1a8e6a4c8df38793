// archfarm dashboard: keeps the server-rendered pages live and wires their buttons to the REST API.
//
// A live part is an element with data-live="NAME": every few seconds it is fetched again as
// ?fragment=NAME of the same page. Contact-sheet cells (data-key) are swapped one by one, so thumbnails
// already shown are never reloaded. A part marked data-while-active stops once the job has ended.
"use strict";

const POLL_MS = 2000;
const lastHtml = new WeakMap();
let wasActive = true;

function jobActive() {
  return !document.querySelector('[data-active="0"]');
}

function patch(region, html) {
  const fresh = document.createElement("template");
  fresh.innerHTML = html;
  const cells = fresh.content.querySelectorAll("[data-key]");
  const current = region.querySelectorAll("[data-key]");
  if (!cells.length || cells.length !== current.length) {
    region.replaceChildren(fresh.content);
    return;
  }
  for (const cell of cells) {
    const old = region.querySelector(`[data-key="${CSS.escape(cell.dataset.key)}"]`);
    if (!old) {
      region.replaceChildren(fresh.content);
      return;
    }
    if (!old.isEqualNode(cell)) old.replaceWith(cell);
  }
}

async function refresh(region) {
  const url = new URL(location.href);
  url.searchParams.set("fragment", region.dataset.live);
  const response = await fetch(url, { headers: { Accept: "text/html" } });
  if (!response.ok) return;
  const html = await response.text();
  if (lastHtml.get(region) === html) return;
  lastHtml.set(region, html);
  patch(region, html);
}

async function refreshAll(force = false) {
  const active = jobActive();
  for (const region of document.querySelectorAll("[data-live]")) {
    if ("whileActive" in region.dataset && !active && !wasActive && !force) continue;
    try {
      await refresh(region);
    } catch (error) {
      // The server is restarting or the network is away: the next round tries again.
    }
  }
  wasActive = active;
}

async function tick() {
  if (!document.hidden) await refreshAll();
  setTimeout(tick, POLL_MS);
}

function flash(message) {
  const box = document.getElementById("flash");
  box.textContent = message || "";
  box.hidden = !message;
}

async function post(url, body) {
  const init = { method: "POST" };
  if (body !== undefined) {
    init.headers = { "Content-Type": "application/json" };
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  if (response.ok) {
    flash("");
  } else {
    const answer = await response.json().catch(() => ({}));
    flash(typeof answer.detail === "string" ? answer.detail : `${response.status} ${response.statusText}`);
  }
  await refreshAll(true);
}

async function openDetails(href) {
  const dialog = document.getElementById("details");
  const url = new URL(href, location.href);
  url.searchParams.set("fragment", "artifact");
  const response = await fetch(url);
  dialog.querySelector(".body").innerHTML = await response.text();
  if (!dialog.open) dialog.showModal();
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-post]");
  if (button) {
    event.preventDefault();
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    button.disabled = true;
    post(button.dataset.post);
    return;
  }
  const pick = event.target.closest("button[data-pick], button[data-pick-done]");
  if (pick) {
    event.preventDefault();
    if (pick.dataset.confirm && !window.confirm(pick.dataset.confirm)) return;
    if ("pickDone" in pick.dataset) {
      post(pick.dataset.pickDone, { done: true });
      return;
    }
    const chosen = [...document.querySelectorAll("input[data-pick]:checked:not(:disabled)")].map((box) => Number(box.value));
    if (!chosen.length) {
      flash("Tick the drafts to finish first.");
      return;
    }
    post(pick.dataset.pick, { artifacts: chosen });
    return;
  }
  const link = event.target.closest("a[data-artifact]");
  if (link && !(event.ctrlKey || event.metaKey || event.shiftKey)) {
    event.preventDefault();
    openDetails(link.href);
  }
});

// A revision's region: dragged over an image (in its pixels, whatever size it is shown at).
let drag = null;
let dragged = false;

function regionOf(image, from, to) {
  const box = image.getBoundingClientRect();
  const scale = image.naturalWidth / box.width;
  const clamp = (value, size) => Math.max(0, Math.min(size, value));
  const x = [from.x, to.x].map((v) => clamp(v - box.left, box.width));
  const y = [from.y, to.y].map((v) => clamp(v - box.top, box.height));
  return {
    shown: { left: Math.min(...x), top: Math.min(...y), width: Math.abs(x[1] - x[0]), height: Math.abs(y[1] - y[0]) },
    rect: [Math.min(...x), Math.min(...y), Math.max(...x), Math.max(...y)].map((v) => Math.round(v * scale)),
  };
}

document.addEventListener("mousedown", (event) => {
  const image = event.target.closest("img[data-revisable]");
  if (!image) return;
  event.preventDefault(); // no native image drag
  drag = { image, from: { x: event.clientX, y: event.clientY } };
  dragged = false;
});

document.addEventListener("mousemove", (event) => {
  if (!drag) return;
  const { shown, rect } = regionOf(drag.image, drag.from, { x: event.clientX, y: event.clientY });
  dragged = shown.width > 2 && shown.height > 2;
  const overlay = drag.image.closest(".revisable").querySelector(".region");
  Object.assign(overlay.style, { left: `${shown.left}px`, top: `${shown.top}px`, width: `${shown.width}px`, height: `${shown.height}px` });
  overlay.hidden = !dragged;
  overlay.dataset.rect = JSON.stringify(rect);
});

document.addEventListener("mouseup", () => {
  drag = null;
});

document.addEventListener(
  "click",
  (event) => {
    if (dragged && event.target.closest("img[data-revisable]")) {
      event.preventDefault(); // a drag marks a region: it does not open the image
      event.stopPropagation();
      dragged = false;
    }
  },
  true,
);

async function revise(form) {
  const overlay = form.closest(".artifact").querySelector(".region");
  if (overlay.hidden || !overlay.dataset.rect) {
    flash("Drag over the image to mark the region to revise first.");
    return;
  }
  const body = {
    rect: JSON.parse(overlay.dataset.rect),
    prompt: form.elements.prompt.value,
    seeds: Number(form.elements.seeds.value),
  };
  const response = await fetch(form.dataset.revise, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  flash(response.ok ? `revision job ${answer.id} queued` : answer.detail || `${response.status} ${response.statusText}`);
}

document.addEventListener("submit", (event) => {
  const revision = event.target.closest("form[data-revise]");
  if (revision) {
    event.preventDefault();
    revise(revision);
    return;
  }
  const form = event.target.closest("form[data-priority]");
  if (!form) return;
  event.preventDefault();
  post(form.action, { priority: Number(form.elements.priority.value) });
});

document.getElementById("details").addEventListener("click", (event) => {
  if (event.target === event.currentTarget) event.currentTarget.close(); // a click on the backdrop
});

setTimeout(tick, POLL_MS);
