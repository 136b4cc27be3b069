"use strict";
(() => {
  let state = JSON.parse(document.getElementById("initial-state").textContent);
  const MAP = JSON.parse(document.getElementById("map-data").textContent);  // the world: it does not change
  let chosenTrip = null;  // the trip whose route the map draws (default: the next one)
  let receivedAt = performance.now();
  let streamUp = true;  // our own link to this dashboard (EventSource)
  const LIVE = new Set(["held", "booked", "charging"]);
  const OP_COLOURS = ["#1765c1", "#b4491c", "#0f8a78", "#7a3db8", "#b0126a", "#5c6b0f"];
  const $ = (id) => document.getElementById(id);
  const esc = (v) => String(v ?? "").replace(/[&<>"']/g,
    (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
  const ms = (iso) => Date.parse(iso);
  const pad = (n) => String(n).padStart(2, "0");
  const day = (t) => new Date(t).toISOString().slice(0, 10);

  function now() {  // the server's simulated time, in ms
    if (!state.server_time) return null;
    const t = ms(state.server_time);
    return state.connected ? t + (performance.now() - receivedAt) * (state.time_scale || 1) : t;
  }
  function hm(t) { const d = new Date(t); return pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes()); }
  function at(iso, ref) {  // "14:30", or "11-24 14:30" on another day than ref
    const t = ms(iso);
    return (ref !== null && day(t) === day(ref) ? "" : new Date(t).toISOString().slice(5, 10) + " ") + hm(t);
  }
  function span(minutes) {
    if (minutes < 90) return minutes + " min";
    const h = Math.floor(minutes / 60), m = minutes % 60;
    return h + " h" + (m ? " " + pad(m) + " min" : "");
  }
  function rel(iso, ref) {
    const m = Math.round((ms(iso) - ref) / 60000);
    return m > 0 ? "in " + span(m) : m < 0 ? span(-m) + " ago" : "now";
  }
  function pill(text, colour) { return `<span class="st" style="--c: var(--${colour})">${esc(text)}</span>`; }
  function statusPill(s) { return pill(s, String(s).replace(/[^a-z]/g, "")); }
  function opBadge(id) {
    const ids = Object.keys(state.operators || {});
    const colour = OP_COLOURS[Math.max(0, ids.indexOf(id)) % OP_COLOURS.length];
    const name = (state.operators || {})[id] || id;
    const mine = id === state.operator_id ? " mine" : "";
    return `<span class="op${mine}" style="background:${colour}" title="${esc(name)}">${esc(id)}</span>`;
  }
  function freeText(cp, ref) {
    if (["offline", "faulted", "unavailable"].includes(cp.status)) return '<span class="muted">&mdash;</span>';
    const m = cp.free_at && ref !== null ? Math.round((ms(cp.free_at) - ref) / 60000) : 0;
    return m <= 0 ? '<span class="free-now">free now</span>' : "free in " + span(m);
  }
  function tripState(trip, ref) {  // a committed trip whose every stop has ended is done
    const stops = trip.stops || [];
    const last = stops.length ? ms(stops[stops.length - 1].slot_end) : ms(trip.arrival);
    return trip.state === "committed" && ref !== null && last <= ref ? "completed" : trip.state;
  }
  const where = {};  // charge point id -> station
  function indexStations() {
    for (const s of state.stations) for (const cp of s.charge_points || []) where[cp.id] = s;
  }

  function renderHeader(ref) {
    $("title").textContent = `${state.operator_name} (${state.operator_id})`;
    const link = $("link");
    if (!streamUp) { link.className = "badge down"; link.textContent = "dashboard offline"; }
    else if (state.connected) { link.className = "badge up"; link.textContent = "live"; }
    else if (state.snapshot_time) { link.className = "badge down"; link.textContent = "disconnected"; }
    else { link.className = "badge wait"; link.textContent = "connecting"; }
    const c = state.connections || {};
    const online = Object.entries(c).map(([role, n]) => `${n} ${role}${n === 1 ? "" : "s"}`).join(", ");
    $("sub").textContent = `server ${state.server}` + (online ? ` \u00b7 clients: ${online}` : "");
    $("clock").innerHTML = ref === null ? "" :
      `<b>${hm(ref)}</b> UTC <span class="sub">${day(ref)} \u00b7 simulated, \u00d7${state.time_scale}</span>`;
    document.body.classList.toggle("stale", !state.connected || !streamUp);
    let banner = "";
    if (!streamUp) {
      banner = `<div class="banner">Lost the link to this dashboard; retrying. What you see may be out of date.</div>`;
    } else if (!state.connected && state.snapshot_time) {
      banner = `<div class="banner">Not connected to operator ${esc(state.operator_id)}'s server at
        ${esc(state.server)} (${esc(state.error)}). Showing the last state, from ${esc(at(state.snapshot_time,
        null))} UTC; reconnecting by itself.</div>`;
    } else if (!state.connected) {
      banner = `<div class="banner info">Connecting to operator ${esc(state.operator_id)}'s server at
        ${esc(state.server)}\u2026 ${state.error ? "(" + esc(state.error) + ")" : ""}</div>`;
    }
    $("banner").innerHTML = banner;
  }

  function renderStations(ref) {
    const counts = {};
    const cities = new Map();
    for (const s of state.stations) {
      if (!cities.has(s.city)) cities.set(s.city, []);
      cities.get(s.city).push(s);
      for (const cp of s.charge_points || []) counts[cp.status] = (counts[cp.status] || 0) + 1;
    }
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    let out = `<h2>Stations<span class="n">${state.stations.length}</span> \u00b7 charge points<span
      class="n">${total}</span></h2>`;
    out += `<div class="summary">` + ["available", "reserved", "charging", "faulted", "unavailable", "offline"]
      .map((s) => `<span>${statusPill(s)} ${counts[s] || 0}</span>`).join("") + `</div>`;
    if (!state.stations.length) out += `<div class="empty">No state yet.</div>`;
    for (const city of [...cities.keys()].sort((a, b) => a.localeCompare(b))) {
      out += `<div class="city"><h3>${esc(city)}</h3>`;
      for (const s of cities.get(city).sort((a, b) => a.name.localeCompare(b.name))) {
        out += `<div class="card"><div class="head"><span class="name">${esc(s.name)}</span>
          <span class="id">${esc(s.id)}</span></div><table><thead><tr><th>charge point</th><th class="num">kW</th>
          <th>connector</th><th class="num">R$/kWh</th><th>status</th><th>free</th></tr>
          </thead><tbody>`;
        for (const cp of s.charge_points || []) {
          out += `<tr><td class="id">${esc(cp.id)}</td><td class="num">${esc(cp.power_kw)}</td>
            <td>${esc(cp.connector)}</td><td class="num">${Number(cp.price_per_kwh).toFixed(2)}</td>
            <td>${statusPill(cp.status)}</td><td>${freeText(cp, ref)}</td></tr>`;
        }
        out += `</tbody></table></div>`;
      }
      out += `</div>`;
    }
    $("stations").innerHTML = out;
  }

  function reservationTable(rows, ref, withRel) {
    if (!rows.length) return `<div class="empty">None.</div>`;
    let out = `<div class="card"><table><thead><tr><th>reservation</th><th>vehicle</th><th>charge point</th>
      <th>slot (UTC)</th><th>state</th></tr></thead><tbody>`;
    for (const r of rows) {
      const station = where[r.charge_point_id];
      const trip = r.trip_id ? `<div class="id">trip ${esc(r.trip_id)}</div>` : "";
      const when = withRel ? `<div class="muted">${rel(r.start, ref)}</div>` : "";
      // A session that is charging shows its energy and cost from the start, and as they grow.
      const energy = r.kwh || r.state === "charging" ? `<div class="muted energy">${Number(r.kwh).toFixed(2)} kWh,
        R$ ${Number(r.cost).toFixed(2)}</div>` : "";
      out += `<tr><td class="id">${esc(r.id)}${trip}</td><td>${esc(r.vehicle_id)}</td>
        <td>${esc(r.charge_point_id)}<div class="muted">${esc(station ? station.name : "")}</div></td>
        <td class="slot">${at(r.start, ref)}&ndash;${hm(ms(r.end))}${when}</td>
        <td>${statusPill(r.state)}${energy}</td></tr>`;
    }
    return out + `</tbody></table></div>`;
  }

  function renderReservations(ref) {
    const t = ref === null ? 0 : ref;
    const live = state.reservations.filter((r) => LIVE.has(r.state));
    const current = live.filter((r) => r.state === "charging" || (ms(r.start) <= t && t < ms(r.end)));
    const upcoming = live.filter((r) => !current.includes(r) && ms(r.start) > t)
      .sort((a, b) => ms(a.start) - ms(b.start));
    const ended = state.reservations.filter((r) => !LIVE.has(r.state))
      .sort((a, b) => ms(b.end) - ms(a.end)).slice(0, 8);
    $("current").innerHTML = `<h2>Now<span class="n">${current.length}</span></h2>` +
      reservationTable(current, ref, false);
    $("upcoming").innerHTML = `<h2>Upcoming reservations<span class="n">${upcoming.length}</span></h2>` +
      reservationTable(upcoming, ref, true);
    $("ended").innerHTML = `<h2>Recently ended</h2>` + reservationTable(ended, ref, false);
  }

  function renderTrips(ref) {
    const trips = sortedTrips(ref);
    let out = `<h2>Trips coordinated here<span class="n">${trips.length}</span></h2>`;
    if (!trips.length) out += `<div class="empty">None.</div>`;
    const shown = mappedTrip(ref);
    for (const trip of trips) {
      const owners = [...new Set((trip.stops || []).map((s) => s.operator_id))].map(opBadge).join(" ");
      const on = shown && shown.id === trip.id ? " on-map" : "";
      out += `<div class="card trip${on}" data-trip="${esc(trip.id)}" title="show its route on the map">
        <div class="head"><span class="name">${esc(trip.origin)} &rarr;
        ${esc(trip.destination)}</span>${statusPill(tripState(trip, ref))}<span>${esc(trip.vehicle_id)}</span>
        <span class="id">${esc(trip.id)}</span><span style="margin-left:auto">${owners}</span></div>
        <div class="muted">departs ${at(trip.depart, ref)}, arrives ${at(trip.arrival, ref)} \u00b7
        ${Math.round(trip.distance_km)} km \u00b7 ${Number(trip.total_kwh).toFixed(1)} kWh \u00b7
        R$ ${Number(trip.total_cost).toFixed(2)} \u00b7 arrives with ${Math.round(trip.soc_at_arrival)}%</div>
        <ol class="stops">`;
      for (const s of trip.stops || []) {
        out += `<li>${opBadge(s.operator_id)} <b>${esc(s.city)}</b> \u00b7 ${esc(s.station_name)}
          <span class="id">${esc(s.charge_point_id)}</span> ${esc(s.power_kw)} kW \u00b7
          ${at(s.slot_start, ref)}&ndash;${hm(ms(s.slot_end))} \u00b7 ${Math.round(s.soc_in)}&rarr;${
          Math.round(s.soc_out)}% \u00b7 R$ ${Number(s.cost).toFixed(2)}
          ${s.reservation_id ? `<span class="id">${esc(s.reservation_id)}</span>` : ""}</li>`;
      }
      out += `</ol></div>`;
    }
    $("trips").innerHTML = out;
  }

  function sortedTrips(ref) {  // live ones first, the soonest first; then the rest, the latest first
    const live = (t) => tripState(t, ref) === "committed";
    return [...state.trips].sort((a, b) => live(b) - live(a) ||
      (live(a) ? ms(a.depart) - ms(b.depart) : ms(b.depart) - ms(a.depart)));
  }
  function mappedTrip(ref) {
    const trips = sortedTrips(ref);
    return trips.find((t) => t.id === chosenTrip) || trips.find((t) => tripState(t, ref) === "committed") || null;
  }

  // --- the map: drawn by us from the world's coordinates (no tiles: it works offline) -------------------------
  const SCALE = 100;  // SVG units per degree of latitude
  const bounds = (() => {
    const lats = [...MAP.stations, ...MAP.cities].map((p) => p.lat);
    const lons = [...MAP.stations, ...MAP.cities].map((p) => p.lon);
    // Room for the names east of the easternmost places, and for a strip of sea.
    return { north: Math.max(...lats) + 0.5, south: Math.min(...lats) - 0.5,
      west: Math.min(...lons) - 0.5, east: Math.max(...lons) + 1.6 };
  })();
  const shrink = Math.cos(((bounds.north + bounds.south) / 2) * Math.PI / 180);  // a degree of longitude is shorter
  function xy(lat, lon) {
    return [((lon - bounds.west) * shrink * SCALE).toFixed(1), ((bounds.north - lat) * SCALE).toFixed(1)];
  }
  const mapWidth = (bounds.east - bounds.west) * shrink * SCALE, mapHeight = (bounds.north - bounds.south) * SCALE;
  const worldStation = Object.fromEntries(MAP.stations.map((s) => [s.id, s]));
  const cityAt = Object.fromEntries(MAP.cities.map((c) => [c.name, c]));

  function renderMap(ref) {
    const land = [...MAP.coast.map(([lat, lon]) => xy(lat, lon).join(",")),
      xy(MAP.coast[MAP.coast.length - 1][0], bounds.west - 20).join(","), xy(MAP.coast[0][0], bounds.west - 20).join(",")];
    let svg = `<svg id="map-svg" viewBox="0 0 ${mapWidth.toFixed(0)} ${mapHeight.toFixed(0)}" role="img"
      aria-label="map of the stations"><rect class="sea" width="100%" height="100%"/>
      <polygon class="land" points="${land.join(" ")}"/>
      <polyline class="coast" points="${MAP.coast.map(([lat, lon]) => xy(lat, lon).join(",")).join(" ")}"/>`;
    for (const st of MAP.states) {
      const [x, y] = xy(st.lat, st.lon);
      svg += `<text class="state" x="${x}" y="${y}">${esc(st.name)}</text>`;
    }
    for (const c of MAP.cities) {
      const [x, y] = xy(c.lat, c.lon);
      svg += `<rect class="city" x="${x - 4}" y="${y - 4}" width="8" height="8"/>
        <text class="city" x="${Number(x) + 12}" y="${Number(y) - 8}">${esc(c.name)}</text>`;
    }
    const live = Object.fromEntries(state.stations.map((s) => [s.id, s]));
    for (const s of MAP.stations.filter((s) => !live[s.id])) {  // the other operators': where, not how
      const [x, y] = xy(s.lat, s.lon);
      svg += `<circle class="other" cx="${x}" cy="${y}" r="7"><title>${esc(s.name)} (operator ${
        esc(s.operator_id)})</title></circle>`;
    }
    for (const s of state.stations) {  // ours: a dot per charge point, coloured by its live status
      const cps = s.charge_points || [];
      const [x, y] = xy(s.lat, s.lon);
      cps.forEach((cp, i) => {
        const cx = (Number(x) + (i - (cps.length - 1) / 2) * 22).toFixed(1);
        svg += `<circle class="cp" data-cp="${esc(cp.id)}" data-status="${esc(cp.status)}" cx="${cx}" cy="${y}"
          r="10" style="fill: var(--${String(cp.status).replace(/[^a-z]/g, "")})"><title>${esc(cp.id)} · ${
          esc(s.name)}: ${esc(cp.status)}</title></circle>`;
      });
    }
    const trip = mappedTrip(ref);
    if (trip) svg += routeSvg(trip);
    svg += `</svg>`;
    const legend = ["available", "reserved", "charging", "faulted", "unavailable", "offline"]
      .map((s) => `<span><i style="background: var(--${s})"></i>${s}</span>`).join("") +
      `<span><i class="other"></i>other operators</span>`;
    const caption = trip ? `route of trip <b class="id">${esc(trip.id)}</b> (${esc(trip.origin)} &rarr; ${
      esc(trip.destination)}, ${esc(trip.vehicle_id)}); click a trip to show another` : "no trip to show";
    $("map").innerHTML = `<h2>Map</h2><div class="card map">${svg}<div class="legend">${legend}</div>
      <div class="muted caption">${caption}</div></div>`;
  }

  function routeSvg(trip) {
    const start = cityAt[trip.origin], end = cityAt[trip.destination];
    const stops = (trip.stops || []).map((s) => worldStation[s.station_id] || cityAt[s.city]).filter(Boolean);
    const points = [start, ...stops, end].filter(Boolean).map((p) => xy(p.lat, p.lon).join(","));
    let out = `<polyline class="route${trip.state === "committed" ? "" : " gone"}" points="${points.join(" ")}"/>`;
    (trip.stops || []).forEach((s, i) => {
      const where = worldStation[s.station_id] || cityAt[s.city];
      if (!where) return;
      const [x, y] = xy(where.lat, where.lon);
      const up = (Number(y) - 34).toFixed(1);  // the number above the place, not over its charge points' dots
      out += `<g class="stop"><line x1="${x}" y1="${y}" x2="${x}" y2="${up}"/><circle cx="${x}" cy="${up}" r="15"/>
        <text x="${x}" y="${(Number(up) + 6).toFixed(1)}">${i + 1}</text>
        <title>${i + 1}. ${esc(s.city)} · ${esc(s.station_name)} ${esc(s.charge_point_id)} (${
        esc(s.operator_id)}) ${at(s.slot_start, null)}&ndash;${hm(ms(s.slot_end))}</title></g>`;
    });
    return out;
  }

  // --- the timeline: each charge point's day (reservations, charging, free gaps) ---------------------------------
  // A day around now: from 6 hours before it (on the hour) to 18 after, so that just after midnight the
  // evening is still there, and just before it the night ahead.
  const LABEL = 150, DAY_WIDTH = 1000, ROW = 26, TOP = 22, HOUR = 3600000;
  function renderTimeline(ref) {
    const t = ref === null ? Date.now() : ref;
    const dayStart = Math.floor(t / HOUR) * HOUR - 6 * HOUR, dayEnd = dayStart + 24 * HOUR;
    const x = (when) => (LABEL + (Math.min(Math.max(when, dayStart), dayEnd) - dayStart) / 86400000 * DAY_WIDTH)
      .toFixed(1);
    const cps = state.stations.flatMap((s) => (s.charge_points || []).map((cp) => ({ cp, station: s })));
    const height = TOP + cps.length * ROW + 4;
    let svg = `<svg id="timeline-svg" viewBox="0 0 ${LABEL + DAY_WIDTH + 24} ${height}" role="img"
      aria-label="the day of each charge point">`;
    for (let tick = Math.ceil(dayStart / (3 * HOUR)) * 3 * HOUR; tick <= dayEnd; tick += 3 * HOUR) {
      const hx = x(tick);
      const label = new Date(tick).getUTCHours() === 0 ? day(tick).slice(5) : hm(tick);  // a new day: its date
      svg += `<line class="hour" x1="${hx}" x2="${hx}" y1="${TOP - 4}" y2="${height}"/>
        <text class="hour" x="${hx}" y="${TOP - 8}">${label}</text>`;
    }
    const byCp = {};
    for (const r of state.reservations) (byCp[r.charge_point_id] = byCp[r.charge_point_id] || []).push(r);
    cps.forEach(({ cp }, i) => {
      const y = TOP + i * ROW;
      const inService = !["offline", "faulted", "unavailable"].includes(cp.status);
      svg += `<g class="row" data-cp="${esc(cp.id)}"><text class="cp" x="0" y="${y + 17}">${esc(cp.id)}</text>
        <rect class="${inService ? "free" : "out"}" x="${LABEL}" y="${y + 3}" width="${DAY_WIDTH}" height="${ROW - 6}">
        <title>${esc(cp.id)}: ${inService ? "free where nothing is booked" : esc(cp.status)}</title></rect>`;
      for (const r of byCp[cp.id] || []) {
        if (r.state === "cancelled" || r.state === "aborted") continue;  // it gave its slot back
        const a = ms(r.start), b = ms(r.end);
        if (b <= dayStart || a >= dayEnd) continue;
        const w = Math.max(2, x(b) - x(a)).toFixed(1);
        svg += `<rect class="slot" data-state="${esc(r.state)}" x="${x(a)}" y="${y + 3}" width="${w}"
          height="${ROW - 6}" style="fill: var(--${esc(r.state)})"><title>${esc(r.id)} ${esc(r.vehicle_id)} ${
          hm(a)}&ndash;${hm(b)} ${esc(r.state)}${r.kwh ? ", " + Number(r.kwh).toFixed(1) + " kWh" : ""}</title></rect>`;
      }
      svg += `</g>`;
    });
    if (ref !== null) svg += `<line class="now" x1="${x(t)}" x2="${x(t)}" y1="${TOP - 4}" y2="${height}"/>`;
    svg += `</svg>`;
    const legend = ["booked", "held", "charging", "completed", "expired"]
      .map((s) => `<span><i style="background: var(--${s})"></i>${s}</span>`).join("") +
      `<span><i class="free"></i>free</span><span><i class="out"></i>out of service</span>`;
    $("timeline").innerHTML = `<h2>The day at the charge points <span class="sub">${at(new Date(dayStart)
      .toISOString(), null)}&ndash;${at(new Date(dayEnd).toISOString(), null)} UTC, simulated</span></h2>
      <div class="card timeline">${cps.length ? svg : `<div class="empty">No state yet.</div>`}
      <div class="legend">${legend}</div></div>`;
  }

  function renderPeers(ref) {
    let out = `<h2>Peer links<span class="n">${state.peers.length}</span></h2>`;
    if (!state.peers.length) { $("peers").innerHTML = out + `<div class="empty">Not federated.</div>`; return; }
    out += `<div class="card"><table><thead><tr><th>operator</th><th>address</th><th>link</th>
      <th>last seen</th><th>last error</th></tr></thead><tbody>`;
    for (const peer of state.peers) {
      const name = (state.operators || {})[peer.operator_id] || "";
      out += `<tr><td>${opBadge(peer.operator_id)} ${esc(name)}</td><td class="id">${esc(peer.address)}</td>
        <td>${peer.up ? pill("up", "available") : pill("down", "faulted")}</td>
        <td>${peer.last_seen ? at(peer.last_seen, ref) : ""}</td>
        <td class="muted">${esc(peer.last_error || "")}</td></tr>`;
    }
    $("peers").innerHTML = out + `</tbody></table></div>`;
  }

  function render() {
    const ref = now();
    indexStations();
    renderHeader(ref);
    renderMap(ref);
    renderTimeline(ref);
    renderStations(ref);
    renderReservations(ref);
    renderTrips(ref);
    renderPeers(ref);
  }

  render();
  $("trips").addEventListener("click", (e) => {  // a trip clicked: its route on the map
    const card = e.target.closest("[data-trip]");
    if (card) { chosenTrip = card.dataset.trip; render(); }
  });
  if (window.EventSource) {
    const events = new EventSource("/api/events");
    events.addEventListener("state", (e) => {
      state = JSON.parse(e.data);
      receivedAt = performance.now();
      streamUp = true;
      render();
    });
    events.onopen = () => { streamUp = true; };
    events.onerror = () => { streamUp = false; renderHeader(now()); };
  }
  setInterval(render, 1000);  // the clock and "free in N min" move on between changes
})();
