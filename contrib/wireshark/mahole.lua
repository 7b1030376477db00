-- Wireshark dissector for mahole relay frames (see mahole/wire/relay.py):
--
--     0x10 | session_id (8) | relay_token (8) | inner packet
--
-- A node sends each end-to-end packet to the intermediate wrapped in a relay frame; the
-- intermediate forwards the frame unchanged. This dissector shows the session id and the
-- relay token and hands the inner packet to Wireshark's QUIC dissector, which decrypts it
-- with the keylog of either end (`--keylog FILE`, Wireshark's tls.keylog_file).
--
-- Load:   wireshark -X lua_script:contrib/wireshark/mahole.lua capture.pcap
-- or copy this file into Wireshark's personal Lua plugins folder (Help > About > Folders).
--
-- UDP port 4478 (the intermediate's default) is decoded as mahole: every datagram of it is
-- told apart by its first byte (STUN, relay frame, QUIC). For an intermediate on another
-- port, add `-d udp.port==PORT,mahole` (Decode As). This matters: a node's relay frames
-- share its UDP flow with the intermediate with its control connection, and once
-- Wireshark's QUIC heuristic has claimed that flow it reads relay frames as broken QUIC.
-- Relay frames in flows nothing else has claimed are found heuristically anyway.

local mahole = Proto("mahole", "mahole relay frame")

local HEADER_LEN = 17        -- 1 + 8 + 8
local FRAME_TYPE = 0x10

local f_type = ProtoField.uint8("mahole.type", "Frame type", base.HEX)
local f_session = ProtoField.bytes("mahole.session_id", "Session id")
local f_token = ProtoField.bytes("mahole.relay_token", "Relay token")
local f_inner_len = ProtoField.uint32("mahole.inner_length", "Inner packet length")
mahole.fields = { f_type, f_session, f_token, f_inner_len }

local quic = Dissector.get("quic")
local stun = Dissector.get("stun-udp")
local data = Dissector.get("data")

local function is_relay_frame(tvb)
    return tvb:len() > HEADER_LEN and tvb(0, 1):uint() == FRAME_TYPE
end

-- One mahole socket carries STUN (first byte 0x00-0x03, RFC 8489 §5), relay frames (0x10)
-- and QUIC (fixed bit set: 0x40-0xff, RFC 9000 §17); the first byte tells them apart.
local function demultiplex(tvb, pinfo, tree)
    local first = tvb(0, 1):uint()
    if first <= 0x03 then
        stun:call(tvb, pinfo, tree)
    elseif bit.band(first, 0x40) ~= 0 then
        quic:call(tvb, pinfo, tree)
    else
        data:call(tvb, pinfo, tree)
    end
end

local function dissect_relay_frame(tvb, pinfo, tree)
    local item = tree:add(mahole, tvb(0, HEADER_LEN))
    item:add(f_type, tvb(0, 1))
    item:add(f_session, tvb(1, 8))
    item:add(f_token, tvb(9, 8))
    item:add(f_inner_len, tvb:len() - HEADER_LEN)
    item:append_text(", session " .. tvb(1, 8):bytes():tohex(true))
    demultiplex(tvb(HEADER_LEN):tvb("Inner packet"), pinfo, tree)
    pinfo.cols.protocol:set("mahole/" .. tostring(pinfo.cols.protocol))
    return tvb:len()
end

-- On a port given to mahole (4478, or Decode As): every datagram of the socket.
function mahole.dissector(tvb, pinfo, tree)
    if tvb:len() == 0 then
        return 0
    end
    if is_relay_frame(tvb) then
        return dissect_relay_frame(tvb, pinfo, tree)
    end
    demultiplex(tvb, pinfo, tree)
    return tvb:len()
end

-- Elsewhere: relay frames in UDP flows no other dissector has claimed.
local function heuristic(tvb, pinfo, tree)
    if not is_relay_frame(tvb) then
        return false
    end
    dissect_relay_frame(tvb, pinfo, tree)
    return true
end

mahole:register_heuristic("udp", heuristic)
-- The intermediate's default port, and "Decode As... > UDP port > MAHOLE" for others.
DissectorTable.get("udp.port"):add(4478, mahole)
