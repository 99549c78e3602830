-- Argo CD health check for moat.dev/SecureModelDeployment.
--
-- Reads only the Ready and Stalled conditions and observedGeneration, so new status fields,
-- conditions or reasons never change the verdict:
--   Progressing  the status does not describe the current generation yet
--   Degraded     Stalled=True, whatever its reason: Moat stops and waits for a change (an invalid
--                spec, a missing key, a registry not allowed, a rollout past its deadline, ...)
--   Healthy      Ready=True
--   Progressing  anything else (rolling out, retrying a transient failure)
--
-- Install: see examples/gitops/README.md (resource.customizations.health.moat.dev_SecureModelDeployment).
local hs = {}

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for Moat to observe the SecureModelDeployment"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for Moat to observe the latest spec"
  return hs
end

local ready = nil
local stalled = nil
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    elseif condition.type == "Stalled" then
      stalled = condition
    end
  end
end

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = stalled.message or stalled.reason or "Stalled"
elseif ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
else
  hs.status = "Progressing"
  hs.message = ready.message or "Rolling out"
end
return hs
