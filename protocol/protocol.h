// Transitional: the whole protocol library in one include, for the files of
// the client library that have not moved to ControlClient yet
// (client/broker_client.cc, client/c_api.cc). New code includes the header
// it needs: framing.h, messages.h, status_json.h, json_fields.h,
// socket_path.h or control_client.h.
#ifndef KEYMESH_PROTOCOL_PROTOCOL_H_
#define KEYMESH_PROTOCOL_PROTOCOL_H_

#include "protocol/control_client.h"
#include "protocol/framing.h"
#include "protocol/json_fields.h"
#include "protocol/messages.h"
#include "protocol/socket_path.h"
#include "protocol/status_json.h"

#endif  // KEYMESH_PROTOCOL_PROTOCOL_H_
