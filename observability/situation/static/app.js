// The situation map: Leaflet draws China's administrative boundaries (GeoJSON from this server, no
// tiles), the member cities coloured by health and the open incidents at their coordinates coloured
// by severity; the side panel lists incidents in the order the picture gives (most severe first, then
// oldest first; resolved ones last and hidden unless asked). Live from /api/events (server-sent events).
// Everything from the cluster is put in the page with DOM calls and textContent, never as markup.
"use strict";

const SEVERITIES_DEFAULT = ["critical", "alarm", "warning"];
const DISTRICT_ZOOM = 8;  // districts are drawn from this zoom level on
// Before the boundaries arrive: China with the South China Sea islands (3.8° N) and the ten dashes.
const COUNTRY_VIEW = [[3.4, 73.2], [53.8, 135.2]];

const state = { picture: null, showResolved: false, countryBounds: null };

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function severityColour(severity) {
  const known = (state.picture && state.picture.severities) || SEVERITIES_DEFAULT;
  return cssVar("--sev-" + (known.includes(severity) ? severity : "other"));
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function located(inc) {
  return inc.latitude !== null && inc.latitude !== undefined && inc.longitude !== null && inc.longitude !== undefined;
}

// What the list shows and what the map draws: the same filter as picture.visible_incidents/on_map.
function visibleIncidents(picture) {
  return picture.incidents.filter((i) => state.showResolved || i.state !== "Resolved");
}

function mapStatus(text) {
  document.getElementById("map-status").textContent = text;
}

// ---- the map ------------------------------------------------------------------------------------

const situation = { map: null, incidentMarkers: new Map(), cityMarkers: new Map(), boundaries: null };
window.situation = situation;

// The markers as Leaflet holds them (what the browser test compares with the cluster).
situation.markers = () => [...situation.incidentMarkers.entries()].map(([id, m]) => ({
  id, lat: m.getLatLng().lat, lng: m.getLatLng().lng, severity: m.options.severity,
  state: m.options.state, colour: m.options.fillColor,
}));
situation.cities = () => [...situation.cityMarkers.entries()].map(([name, m]) => ({
  name, lat: m.getLatLng().lat, lng: m.getLatLng().lng, health: m.options.health, colour: m.options.fillColor,
}));

function setData(layer, data) {
  const node = layer.getElement && layer.getElement();
  if (!node) return;
  for (const [k, v] of Object.entries(data)) node.setAttribute("data-" + k, String(v));
}

function initMap() {
  if (!window.L) {
    mapStatus("the mapping library is not installed on the server: run `make web`");
    return;
  }
  const map = L.map("map", { zoomSnap: 0.25, minZoom: 2, maxZoom: 17, worldCopyJump: false });
  map.attributionControl.setPrefix("Leaflet");
  map.createPane("cities").style.zIndex = 610;
  map.createPane("incidents").style.zIndex = 620;
  map.fitBounds(COUNTRY_VIEW);
  situation.map = map;
  situation.districts = L.layerGroup();
  map.on("zoomend", () => {
    const near = map.getZoom() >= DISTRICT_ZOOM;
    if (near && !map.hasLayer(situation.districts)) situation.districts.addTo(map);
    if (!near && map.hasLayer(situation.districts)) map.removeLayer(situation.districts);
  });
  fetch("/data/china-boundaries.geojson")
    .then((r) => { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
    .then(drawBoundaries)
    .catch((e) => mapStatus("boundaries not loaded (" + e.message + "): run `make web` on the server"));
  document.getElementById("fit-country").addEventListener("click", fitCountry);
  document.getElementById("fit-incidents").addEventListener("click", fitIncidents);
}

function escapeText(text) {
  const span = document.createElement("span");
  span.textContent = text;
  return span.innerHTML;
}

function drawBoundaries(geo) {
  const map = situation.map;
  const byLayer = { country: [], province: [], district: [], maritime: [] };
  for (const f of geo.features) (byLayer[f.properties.layer] || []).push(f);
  const line = (name) => cssVar("--line-" + name);
  const country = L.geoJSON(byLayer.country, { interactive: false, style: {
    color: line("country"), weight: 1.4, fillColor: cssVar("--land"), fillOpacity: 1 } }).addTo(map);
  L.geoJSON(byLayer.province, { interactive: false, style: {
    color: line("province"), weight: 0.8, fill: false } }).addTo(map);
  L.geoJSON(byLayer.district, { interactive: false, style: {
    color: line("district"), weight: 0.7, dashArray: "2 3", fill: false } }).addTo(situation.districts);
  L.geoJSON(byLayer.maritime, { interactive: false, style: {
    color: line("maritime"), weight: 2.2, fill: false } }).addTo(map);
  const meta = geo.metadata || {};
  map.attributionControl.addAttribution(escapeText(
    `boundaries: ${meta.dataset} ${meta.version} (${meta.licence}), ${meta.source}`));
  state.countryBounds = country.getBounds();
  situation.boundaries = {
    country: byLayer.country.length, province: byLayer.province.length,
    district: byLayer.district.length, maritime: byLayer.maritime.length,
    south: state.countryBounds.getSouth(), north: state.countryBounds.getNorth(),
    west: state.countryBounds.getWest(), east: state.countryBounds.getEast(),
    dataset: `${meta.dataset} ${meta.version}`,
  };
  fitCountry();
  document.body.dataset.boundaries = "drawn";
}

function fitCountry() {
  if (situation.map) situation.map.fitBounds(state.countryBounds || COUNTRY_VIEW, { padding: [6, 6] });
}

function fitIncidents() {
  const points = [...situation.incidentMarkers.values()].map((m) => m.getLatLng());
  if (!situation.map || points.length === 0) return;
  if (points.length === 1) situation.map.setView(points[0], 12);
  else situation.map.fitBounds(L.latLngBounds(points), { padding: [40, 40], maxZoom: 12 });
}

function incidentPopup(inc) {
  const box = el("div", { class: "popup" });
  const title = el("div", { class: "title" });
  title.appendChild(el("strong", { class: "sev-" + inc.severity }, inc.severity));
  title.appendChild(document.createTextNode(` ${inc.kind} in ${inc.city} — ${inc.state}${inc.drill ? " (drill)" : ""}`));
  box.appendChild(title);
  const where = [inc.location.assetId ? "asset " + inc.location.assetId : "", inc.location.description || ""]
    .filter(Boolean).join(" · ");
  if (where) box.appendChild(el("span", { class: "muted" }, where));
  box.appendChild(el("span", { class: "muted" }, `${inc.latitude}, ${inc.longitude}`));
  box.appendChild(el("span", { class: "muted" }, `${inc.namespace}/${inc.name} · detected ${inc.detectedAt}` +
    (inc.openSeconds !== null ? ` · open ${duration(inc.openSeconds)}` : "")));
  return box;
}

function drawIncidentMarkers(picture) {
  const map = situation.map;
  const wanted = visibleIncidents(picture).filter(located);
  const ids = new Set(wanted.map((i) => i.id));
  for (const [id, marker] of situation.incidentMarkers) {
    if (!ids.has(id)) { map.removeLayer(marker); situation.incidentMarkers.delete(id); }
  }
  // least severe first, so that the most severe ends up on top where markers overlap
  for (const inc of [...wanted].reverse()) {
    const style = {
      radius: inc.severity === "critical" ? 9 : inc.severity === "alarm" ? 8 : 7,
      fillColor: severityColour(inc.severity), fillOpacity: inc.state === "Resolved" ? 0.35 : 0.95,
      color: "#ffffff", weight: 1.6, dashArray: inc.drill ? "3 2" : null,
    };
    let marker = situation.incidentMarkers.get(inc.id);
    if (marker) {
      marker.setLatLng([inc.latitude, inc.longitude]);
      marker.setRadius(style.radius);
      marker.setStyle(style);
      marker.setPopupContent(incidentPopup(inc));
      marker.setTooltipContent(el("span", {}, `${inc.severity} ${inc.kind} — ${inc.state}`));
      marker.bringToFront();
    } else {
      marker = L.circleMarker([inc.latitude, inc.longitude],
        { ...style, pane: "incidents", className: "incident-marker" });
      marker.bindPopup(incidentPopup(inc));
      marker.bindTooltip(el("span", {}, `${inc.severity} ${inc.kind} — ${inc.state}`), { direction: "top" });
      marker.addTo(map);
      situation.incidentMarkers.set(inc.id, marker);
    }
    marker.options.severity = inc.severity;
    marker.options.state = inc.state;
    setData(marker, { incident: inc.id, severity: inc.severity, state: inc.state,
      lat: inc.latitude, lng: inc.longitude });
  }
}

function cityLabel(city) {
  const label = el("span", {}, city.displayName);
  if (city.openIncidents > 0) label.appendChild(el("span", { class: "open" }, ` ${city.openIncidents} open`));
  return label;
}

function drawCityMarkers(picture) {
  const map = situation.map;
  const wanted = picture.cities.filter((c) => c.latitude !== undefined && c.latitude !== null);
  const names = new Set(wanted.map((c) => c.name));
  for (const [name, marker] of situation.cityMarkers) {
    if (!names.has(name)) { map.removeLayer(marker); situation.cityMarkers.delete(name); }
  }
  for (const city of wanted) {
    const style = { radius: 11, fillColor: cssVar("--health-" + city.health) || cssVar("--health-Pending"),
      fillOpacity: 0.9, color: "#ffffff", weight: 2 };
    let marker = situation.cityMarkers.get(city.name);
    if (marker) {
      marker.setLatLng([city.latitude, city.longitude]);
      marker.setStyle(style);
      marker.setTooltipContent(cityLabel(city));
    } else {
      marker = L.circleMarker([city.latitude, city.longitude], { ...style, pane: "cities", className: "city-marker" });
      marker.bindTooltip(cityLabel(city), { permanent: true, direction: "right", offset: [12, 0], className: "city-label" });
      marker.addTo(map);
      situation.cityMarkers.set(city.name, marker);
    }
    marker.options.health = city.health;
    setData(marker, { city: city.name, health: city.health, lat: city.latitude, lng: city.longitude });
  }
}

// ---- the side panel -----------------------------------------------------------------------------

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

function showOnMap(id) {
  const marker = situation.incidentMarkers.get(id);
  if (!marker || !situation.map) return;
  situation.map.setView(marker.getLatLng(), Math.max(situation.map.getZoom(), 11));
  marker.openPopup();
}

function drawIncidents(picture) {
  const list = document.getElementById("incidents");
  list.replaceChildren();
  const shown = visibleIncidents(picture);
  const hidden = picture.incidents.length - shown.length;
  document.getElementById("incident-count").textContent =
    `${shown.length} shown` + (hidden ? ` · ${hidden} resolved hidden` : "");
  if (shown.length === 0) list.appendChild(el("li", { class: "muted" }, "no open incidents"));
  shown.forEach((inc, index) => {
    const item = el("li", { class: "incident", "data-incident": inc.id, "data-state": inc.state,
      "data-severity": inc.severity, "data-detected-at": inc.detectedAt || "", "data-rank": index,
      "data-located": located(inc) });
    const title = el("div", { class: "title" });
    title.appendChild(el("span", { class: "sev-" + inc.severity }, `${inc.severity} `));
    title.appendChild(document.createTextNode(`${inc.kind} in ${inc.city} — ${inc.state}`));
    if (inc.drill) title.appendChild(el("span", { class: "drill" }, "drill"));
    item.appendChild(title);
    const where = inc.location.assetId ? "asset " + inc.location.assetId + " · " : "";
    item.appendChild(el("div", { class: "muted" },
      `${inc.namespace}/${inc.name} · ${where}detected ${inc.detectedAt}` +
      (inc.openSeconds !== null ? ` · open ${duration(inc.openSeconds)}` : "") +
      (inc.responseSeconds ? ` · response ${duration(inc.responseSeconds)}` : "")));
    const place = el("div", { class: "muted place" });
    if (located(inc)) {
      place.appendChild(document.createTextNode(`${inc.latitude}, ${inc.longitude} `));
      const button = el("button", { type: "button", class: "locate" }, "show on map");
      button.addEventListener("click", () => showOnMap(inc.id));
      place.appendChild(button);
    } else {
      place.textContent = "no coordinates: listed, not on the map";
    }
    item.appendChild(place);
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
  });
}

function draw(picture) {
  state.picture = picture;
  if (situation.map) {
    drawIncidentMarkers(picture);
    drawCityMarkers(picture);
  }
  drawCities(picture);
  drawIncidents(picture);
  const ready = picture.cities.filter((c) => c.health === "Ready").length;
  const open = picture.incidents.filter((i) => i.state !== "Resolved");
  const onMap = open.filter(located).length;
  document.getElementById("summary").textContent =
    `${picture.cities.length} cities (${ready} ready) · ${open.length} open incidents` +
    ` (${onMap} on the map${open.length > onMap ? `, ${open.length - onMap} without coordinates` : ""})` +
    ` · updated ${picture.generatedAt}`;
  const error = document.getElementById("error");
  error.hidden = !picture.error;
  error.textContent = picture.error || "";
  document.body.dataset.generatedAt = picture.generatedAt;
}

function live(on) {
  document.getElementById("live").className = "live " + (on ? "on" : "off");
}

function poll() {
  fetch("/api/situation").then((r) => r.json()).then(draw).catch(() => live(false));
}

initMap();
document.getElementById("show-resolved").addEventListener("change", (event) => {
  state.showResolved = event.target.checked;
  if (state.picture) draw(state.picture);
});
if (window.EventSource) {
  const source = new EventSource("/api/events");
  source.onmessage = (event) => { live(true); draw(JSON.parse(event.data)); };
  source.onerror = () => live(false);  // the browser reconnects by itself
} else {
  poll();
  setInterval(poll, 2000);
}
