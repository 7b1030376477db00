-- Wireshark dissector for mahole relay frames (see mahole/wire/relay.py):
--
--     0x10 | session_id (8) | relay_token (8) | inner packet
--
-- A node sends each end-to-end packet to the intermediate wrapped in a relay frame; the
-- intermediate forwards the frame unchanged. This dissector shows the session id and the
-- relay token and hands the inner packet to Wireshark's QUIC dissector, which decrypts it
-- with the keylog of either end (`--keylog FILE`, Wireshark's tls.keylog_file).
--
-- Load:   wireshark -X lua_script:contrib/wireshark/mahole.lua -o udp.try_heuristic_first:TRUE
-- or copy this file into Wireshark's personal Lua plugins folder (Help > About > Folders).
--
-- udp.try_heuristic_first matters: control traffic and relay frames share the node's UDP
-- flow with the intermediate, and once Wireshark's QUIC dissector has claimed that flow it
-- would see relay frames as broken QUIC packets without asking this heuristic first.

local mahole = Proto("mahole", "mahole relay frame")

local HEADER_LEN = 17        -- 1 + 8 + 8
local FRAME_TYPE = 0x10

local f_type = ProtoField.uint8("mahole.type", "Frame type", base.HEX)
local f_session = ProtoField.bytes("mahole.session_id", "Session id")
local f_token = ProtoField.bytes("mahole.relay_token", "Relay token")
local f_inner_len = ProtoField.uint32("mahole.inner_length", "Inner packet length")
mahole.fields = { f_type, f_session, f_token, f_inner_len }

local quic = Dissector.get("quic")

local function is_relay_frame(tvb)
    return tvb:len() > HEADER_LEN and tvb(0, 1):uint() == FRAME_TYPE
end

local function dissect(tvb, pinfo, tree)
    local item = tree:add(mahole, tvb(0, HEADER_LEN))
    item:add(f_type, tvb(0, 1))
    item:add(f_session, tvb(1, 8))
    item:add(f_token, tvb(9, 8))
    item:add(f_inner_len, tvb:len() - HEADER_LEN)
    item:append_text(", session " .. tvb(1, 8):bytes():tohex(true))
    local inner = tvb(HEADER_LEN):tvb("Inner packet")
    -- The inner packet is QUIC (fixed bit set, RFC 9000 §17) or a STUN check (0x00-0x03).
    if bit.band(inner(0, 1):uint(), 0x40) ~= 0 then
        quic:call(inner, pinfo, tree)
    else
        Dissector.get("data"):call(inner, pinfo, tree)
    end
    pinfo.cols.protocol:set("mahole/" .. tostring(pinfo.cols.protocol))
    return tvb:len()
end

function mahole.dissector(tvb, pinfo, tree)
    if not is_relay_frame(tvb) then
        return 0
    end
    return dissect(tvb, pinfo, tree)
end

-- STUN (0x00-0x03) and QUIC with the fixed bit (0x40-0xff) never start with 0x10.
local function heuristic(tvb, pinfo, tree)
    if not is_relay_frame(tvb) then
        return false
    end
    dissect(tvb, pinfo, tree)
    return true
end

mahole:register_heuristic("udp", heuristic)
-- "Decode As... > UDP port > MAHOLE" works too, for a capture on a known port.
DissectorTable.get("udp.port"):add_for_decode_as(mahole)
