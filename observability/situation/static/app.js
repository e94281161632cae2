// The situation picture: draws /api/situation's document, live from /api/events (server-sent events).
// Everything is built with DOM calls and textContent: names from the cluster never become markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function drawMap(picture) {
  const markers = document.getElementById("markers");
  const incidentMarkers = document.getElementById("incident-markers");
  markers.replaceChildren();
  incidentMarkers.replaceChildren();
  for (const inc of picture.incidents) {
    if (inc.x === undefined || inc.state === "Resolved") continue;
    const tri = svg("path", {
      class: "incident-marker", "data-incident": inc.id,
      d: `M${inc.x},${inc.y - 26} l-8,14 l16,0 Z`,
    });
    const title = svg("title");
    title.textContent = `${inc.kind} (${inc.severity}) — ${inc.state}`;
    tri.appendChild(title);
    incidentMarkers.appendChild(tri);
  }
  for (const city of picture.cities) {
    if (city.x === undefined) continue;
    const g = svg("g", { class: "city", "data-city": city.name, "data-health": city.health });
    g.appendChild(svg("circle", { cx: city.x, cy: city.y, r: 11, class: city.health }));
    if (city.openIncidents > 0) {
      const badge = svg("text", { x: city.x, y: city.y + 4, "text-anchor": "middle", class: "badge" });
      badge.textContent = city.openIncidents;
      g.appendChild(badge);
    }
    const label = svg("text", { x: city.x, y: city.y + 30, "text-anchor": "middle" });
    label.textContent = city.displayName;
    g.appendChild(label);
    const sensors = svg("text", { x: city.x, y: city.y + 46, "text-anchor": "middle", class: "sensors" });
    sensors.textContent = `${city.sensorsOnline} sensors online`;
    g.appendChild(sensors);
    const title = svg("title");
    title.textContent = `${city.displayName}: ${city.health} — ${city.message}`;
    g.appendChild(title);
    markers.appendChild(g);
  }
}

function drawCities(picture) {
  const list = document.getElementById("cities");
  list.replaceChildren();
  for (const city of picture.cities) {
    const card = el("div", { class: "card " + city.health, "data-city": city.name });
    card.appendChild(el("span", { class: "name" }, city.displayName));
    card.appendChild(el("span", { class: "health" }, city.health));
    card.appendChild(el("div", {}, `sensors online ${city.sensorsOnline}` +
      ` · open incidents ${city.openIncidents} · scenarios ${city.activeScenarios}`));
    if (city.sensorsByType.length > 0) {
      card.appendChild(el("div", { class: "muted" },
        city.sensorsByType.map((s) => `${s.sensorType} ${s.count}`).join(" · ")));
    }
    card.appendChild(el("div", { class: "muted" },
      `${city.message}${city.lastHeartbeat ? " · heartbeat " + city.lastHeartbeat : ""}`));
    list.appendChild(card);
  }
}

function drawIncidents(picture) {
  const list = document.getElementById("incidents");
  list.replaceChildren();
  if (picture.incidents.length === 0) list.appendChild(el("li", { class: "muted" }, "no incidents reported"));
  for (const inc of picture.incidents) {
    const item = el("li", { class: "incident", "data-incident": inc.id, "data-state": inc.state });
    const title = el("div", { class: "title" });
    title.appendChild(el("span", { class: "sev-" + inc.severity }, `${inc.severity} `));
    title.appendChild(document.createTextNode(`${inc.kind} in ${inc.city} — ${inc.state}`));
    if (inc.drill) title.appendChild(el("span", { class: "drill" }, "drill"));
    item.appendChild(title);
    const where = inc.location.assetId || "";
    item.appendChild(el("div", { class: "muted" },
      `${inc.namespace}/${inc.name} · ${where} · detected ${inc.detectedAt}` +
      (inc.openSeconds !== null ? ` · open ${duration(inc.openSeconds)}` : "") +
      (inc.responseSeconds ? ` · response ${duration(inc.responseSeconds)}` : "")));
    const timeline = el("ol", { class: "timeline" });
    for (const step of inc.timeline) {
      const li = el("li", { class: step.reached ? "reached" : "", "data-step": step.state });
      li.appendChild(el("div", {}, step.state));
      if (step.reached) {
        li.appendChild(el("div", { class: "muted" },
          step.afterSeconds ? "+" + duration(step.afterSeconds) : (step.time || "")));
      }
      timeline.appendChild(li);
    }
    item.appendChild(timeline);
    list.appendChild(item);
  }
}

function draw(picture) {
  drawMap(picture);
  drawCities(picture);
  drawIncidents(picture);
  const ready = picture.cities.filter((c) => c.health === "Ready").length;
  document.getElementById("summary").textContent =
    `${picture.cities.length} cities (${ready} ready) · ${picture.openIncidents} open incidents · ` +
    `updated ${picture.generatedAt}`;
  const error = document.getElementById("error");
  error.hidden = !picture.error;
  error.textContent = picture.error || "";
  document.body.dataset.generatedAt = picture.generatedAt;
}

function live(on) {
  const dot = document.getElementById("live");
  dot.className = "live " + (on ? "on" : "off");
}

function poll() {
  fetch("/api/situation").then((r) => r.json()).then(draw).catch(() => live(false));
}

if (window.EventSource) {
  const source = new EventSource("/api/events");
  source.onmessage = (event) => { live(true); draw(JSON.parse(event.data)); };
  source.onerror = () => live(false);  // the browser reconnects by itself
} else {
  poll();
  setInterval(poll, 2000);
}
