"use strict";
(() => {
  let state = JSON.parse(document.getElementById("initial-state").textContent);
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
  function nextSlots(cp, ref) {
    const ahead = (cp.busy || []).filter((i) => ref === null || ms(i.end) > ref).slice(0, 2);
    return ahead.map((i) => at(i.start, ref) + "&ndash;" + hm(ms(i.end))).join(", ");
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
          <th>connector</th><th class="num">R$/kWh</th><th>status</th><th>free</th><th>next slots</th></tr>
          </thead><tbody>`;
        for (const cp of s.charge_points || []) {
          out += `<tr><td class="id">${esc(cp.id)}</td><td class="num">${esc(cp.power_kw)}</td>
            <td>${esc(cp.connector)}</td><td class="num">${Number(cp.price_per_kwh).toFixed(2)}</td>
            <td>${statusPill(cp.status)}</td><td>${freeText(cp, ref)}</td>
            <td class="muted">${nextSlots(cp, ref)}</td></tr>`;
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
      const energy = r.kwh ? `<div class="muted">${Number(r.kwh).toFixed(1)} kWh, R$ ${
        Number(r.cost).toFixed(2)}</div>` : "";
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
    const trips = [...state.trips].sort((a, b) => (a.state === "cancelled") - (b.state === "cancelled") ||
      ms(b.depart) - ms(a.depart));
    let out = `<h2>Trips coordinated here<span class="n">${trips.length}</span></h2>`;
    if (!trips.length) out += `<div class="empty">None.</div>`;
    for (const trip of trips) {
      const owners = [...new Set((trip.stops || []).map((s) => s.operator_id))].map(opBadge).join(" ");
      out += `<div class="card"><div class="head"><span class="name">${esc(trip.origin)} &rarr;
        ${esc(trip.destination)}</span>${statusPill(trip.state)}<span>${esc(trip.vehicle_id)}</span>
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
    renderStations(ref);
    renderReservations(ref);
    renderTrips(ref);
    renderPeers(ref);
  }

  render();
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
