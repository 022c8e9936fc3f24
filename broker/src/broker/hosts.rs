//! Hosts: registration tokens, registration, heartbeats and command acknowledgements.

use pleiades_protocol::clipboard::{ClipboardPolicy, Direction};
use pleiades_protocol::hostapi::{ClipboardCounts, FileCounts, RunningDesktop, UsbCounts};
use sqlx::{Any, Row, Transaction};

use super::tx::{image_of_desktop, queue_command};
use super::{
    Broker, CommandAck, CommandKind, GuestReport, Heartbeat, HeartbeatReply, HostCommand, HostRegistered,
    HostRegistration, conflict, truncate_reason,
};
use crate::db::{get_i64, get_opt_i64, get_opt_str, get_str, new_id};
use crate::error::{Error, Result};
use crate::model::{
    Actor, CommandState, DesktopState, Host, HostState, HostTokenSpec, PoolNetwork, SessionState, valid_name,
};
use crate::secret;

impl Broker {
    /// A registration token for one host name; one-time tokens work once. Returned once,
    /// stored hashed. Only a token made with `replace` registers a name that a host has
    /// already (that host's identity then goes to whoever registers with it).
    pub async fn create_host_token(&self, actor: &Actor, spec: &HostTokenSpec) -> Result<String> {
        actor.require_admin()?;
        if !valid_name(&spec.name) {
            return Err(Error::Invalid(
                "a host token names its host: letters, digits, '-', '_', '.', '@', at most 64".into(),
            ));
        }
        let token = format!("hrt_{}", secret::new_token());
        sqlx::query(
            "INSERT INTO host_tokens (token_hash, description, one_time, used, created_at, expires_at, host_name, replace_host) \
             VALUES ($1, $2, $3, 0, $4, $5, $6, $7)",
        )
        .bind(secret::token_hash(&token))
        .bind(&spec.description)
        .bind(i64::from(spec.one_time))
        .bind(self.now())
        .bind(self.now() + spec.lifetime_secs.max(1))
        .bind(&spec.name)
        .bind(i64::from(spec.replace))
        .execute(&self.db.pool)
        .await?;
        let detail = format!(
            "{}{}{}",
            if spec.one_time { "one-time" } else { "reusable" },
            if spec.replace { ", replaces the registered host" } else { "" },
            if spec.description.is_empty() { String::new() } else { format!(": {}", spec.description) },
        );
        self.audit(&actor.name, "host.token.create", &spec.name, &detail).await?;
        Ok(token)
    }

    /// Registers a host, or registers an existing one again. A new name takes a token made for
    /// it; a registered name takes that host's current credential (which stays valid: the
    /// host updates its address, certificate and images) or a token made to replace it (the
    /// host gets a new credential and the old one stops working).
    ///
    /// Over HTTPS the host must present its TLS client certificate: a new or replaced host's
    /// is pinned, and a registration with the credential must come with the pinned one (a new
    /// certificate needs a replacement token). Over plain HTTP nothing can be pinned or checked.
    pub async fn register_host(
        &self,
        reg: &HostRegistration,
        client: &str,
        transport: &Transport,
    ) -> Result<HostRegistered> {
        let now = self.now();
        self.limiter.lock().expect("limiter lock").check_registration(
            &self.settings,
            client,
            self.clock.now(),
        )?;
        let registered = self.register_host_checked(reg, client, transport, now).await;
        if registered.is_ok() {
            self.limiter.lock().expect("limiter lock").registered(client);
        }
        registered
    }

    async fn register_host_checked(
        &self,
        reg: &HostRegistration,
        client: &str,
        transport: &Transport,
        now: i64,
    ) -> Result<HostRegistered> {
        if !valid_name(&reg.name)
            || reg.address.is_empty()
            || reg.address.len() > 253
            || reg.session_port == 0
        {
            return Err(Error::Invalid("host: valid name, address, session_port, cores, memory_mib".into()));
        }
        check_capacity(reg.cores, reg.memory_mib)?;
        if reg.images.len() > MAX_REPORTED {
            return Err(Error::Invalid(format!("host: at most {MAX_REPORTED} images")));
        }
        let presented = match transport {
            Transport::PlainHttp => None,
            Transport::Https { client_cert_sha256: Some(sha256) } => Some(sha256.clone()),
            Transport::Https { client_cert_sha256: None } => {
                self.audit(
                    &reg.name,
                    "host.register.denied",
                    &reg.name,
                    &format!("no client certificate over HTTPS; from {client}"),
                )
                .await?;
                return Err(Error::HostCertificate(
                    "registering over HTTPS takes the host's TLS client certificate, which the broker pins \
                     (pleiades-host serve presents its identity, STATE_DIR/host-identity-cert.pem, by itself; \
                     behind a TLS-terminating proxy, the broker serves plain HTTP and pins nothing)"
                        .into(),
                ));
            }
        };
        let existing =
            sqlx::query("SELECT id, credential_hash, client_cert_sha256 FROM hosts WHERE name = $1")
                .bind(&reg.name)
                .fetch_optional(&self.db.pool)
                .await?
                .map(|r| {
                    Ok::<_, Error>((
                        get_str(&r, "id")?,
                        get_str(&r, "credential_hash")?,
                        get_opt_str(&r, "client_cert_sha256")?,
                    ))
                })
                .transpose()?;
        let own_credential = match (&existing, &reg.credential) {
            (Some((_, stored, _)), Some(credential)) => {
                secret::constant_time_eq(secret::token_hash(credential).as_bytes(), stored.as_bytes())
            }
            _ => false,
        };
        // The pin the host has after this registration: its own stays with its credential (a
        // new one takes a replacement token); a new or replaced host gets what it presented.
        let pin = match &existing {
            Some((_, _, pinned)) if own_credential => pinned.clone(),
            _ => presented.clone(),
        };
        if own_credential
            && let (Some(pinned), Transport::Https { .. }) = (&pin, transport)
            && presented.as_deref() != Some(pinned.as_str())
        {
            self.audit(
                &reg.name,
                "host.register.denied",
                &reg.name,
                &format!("its credential with another client certificate; from {client}"),
            )
            .await?;
            return Err(Error::HostCertificate(format!(
                "host {} is pinned to another TLS client certificate: it registers again with its credential \
                 only from the machine that holds its identity; a new identity takes a token made to replace it \
                 (`pleiades-broker host token create --name {} --replace`)",
                reg.name, reg.name
            )));
        }
        let credential = if own_credential {
            if pin.is_none() && presented.is_some() {
                tracing::warn!(
                    host = %reg.name,
                    "registered again with its credential but without a pinned client certificate: it is known by \
                     its credential alone until registered with a replacement token (host token create --replace)"
                );
            }
            reg.credential.clone().unwrap_or_default()
        } else {
            if let Err(refusal) = self.spend_host_token(reg, existing.is_some(), now).await? {
                self.audit(
                    &reg.name,
                    "host.register.denied",
                    &reg.name,
                    &format!("{refusal}; from {client}"),
                )
                .await?;
                return Err(match refusal {
                    TokenRefusal::NameRegistered => Error::Conflict(format!(
                        "host {} is registered: it registers again with its own credential, or with a token \
                         made to replace it (`pleiades-broker host token create --name {} --replace`)",
                        reg.name, reg.name
                    )),
                    _ => Error::Unauthenticated,
                });
            }
            format!("hcr_{}", secret::new_token())
        };
        let mut tx = self.db.pool.begin().await?;
        let id = match &existing {
            Some((id, stored, _)) => {
                // Conditional on the credential read above: two registrations of one name at
                // once cannot both win.
                let updated = sqlx::query(
                    "UPDATE hosts SET address = $1, session_port = $2, cert_sha256 = $3, credential_hash = $4, cores = $5, \
                     memory_mib = $6, state = $7, last_heartbeat = $8, registered_at = $8, client_cert_sha256 = $11 \
                     WHERE id = $9 AND credential_hash = $10",
                )
                .bind(&reg.address)
                .bind(i64::from(reg.session_port))
                .bind(&reg.cert_sha256)
                .bind(secret::token_hash(&credential))
                .bind(reg.cores)
                .bind(reg.memory_mib)
                .bind(HostState::Online.as_str())
                .bind(now)
                .bind(id)
                .bind(stored)
                .bind(&pin)
                .execute(&mut *tx)
                .await?;
                if updated.rows_affected() != 1 {
                    return Err(Error::Conflict(format!("host {} registered concurrently", reg.name)));
                }
                id.clone()
            }
            None => {
                let id = new_id("h");
                sqlx::query(
                    "INSERT INTO hosts (id, name, address, session_port, cert_sha256, credential_hash, cores, memory_mib, state, last_heartbeat, registered_at, client_cert_sha256) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11)",
                )
                .bind(&id)
                .bind(&reg.name)
                .bind(&reg.address)
                .bind(i64::from(reg.session_port))
                .bind(&reg.cert_sha256)
                .bind(secret::token_hash(&credential))
                .bind(reg.cores)
                .bind(reg.memory_mib)
                .bind(HostState::Online.as_str())
                .bind(now)
                .bind(&pin)
                .execute(&mut *tx)
                .await
                .map_err(|e| conflict(e, &format!("host {} registered concurrently", reg.name)))?;
                id
            }
        };
        set_host_images(&mut tx, &id, &reg.images).await?;
        tx.commit().await?;
        let how = match (&existing, own_credential) {
            (None, _) => "new",
            (Some(_), true) => "again, with its credential",
            (Some(_), false) => "replaced, with a replacement token",
        };
        self.audit(
            &reg.name,
            "host.register",
            &reg.name,
            &format!(
                "{how}: {}:{} from {client}, {}",
                reg.address,
                reg.session_port,
                match &pin {
                    Some(sha256) => format!("client certificate {sha256}"),
                    None => "no client certificate pinned".to_owned(),
                }
            ),
        )
        .await?;
        Ok(HostRegistered {
            host_id: id,
            credential,
            ticket_public_key: self.signer.public_key().to_base64(),
            heartbeat_interval_secs: self.settings.heartbeat_interval_secs,
            heartbeat_timeout_secs: self.settings.heartbeat_timeout_secs,
        })
    }

    /// Checks the registration's token against the name it registers and spends it (a
    /// one-time token by a conditional update, so two hosts cannot share one). A refused token
    /// is not spent.
    async fn spend_host_token(
        &self,
        reg: &HostRegistration,
        name_registered: bool,
        now: i64,
    ) -> Result<std::result::Result<(), TokenRefusal>> {
        if reg.token.is_empty() {
            return Ok(Err(TokenRefusal::Invalid));
        }
        let hash = secret::token_hash(&reg.token);
        let row = sqlx::query(
            "SELECT host_name, replace_host FROM host_tokens WHERE token_hash = $1 AND expires_at > $2 AND (one_time = 0 OR used = 0)",
        )
        .bind(&hash)
        .bind(now)
        .fetch_optional(&self.db.pool)
        .await?;
        let Some(row) = row else { return Ok(Err(TokenRefusal::Invalid)) };
        let replace = get_i64(&row, "replace_host")? != 0;
        match get_opt_str(&row, "host_name")? {
            Some(name) if name == reg.name => {}
            Some(_) => return Ok(Err(TokenRefusal::OtherName)),
            // A token from before tokens named their host: new names only.
            None if !name_registered => {}
            None => return Ok(Err(TokenRefusal::OtherName)),
        }
        if name_registered && !replace {
            return Ok(Err(TokenRefusal::NameRegistered));
        }
        let spent = sqlx::query("UPDATE host_tokens SET used = used + 1 WHERE token_hash = $1 AND expires_at > $2 AND (one_time = 0 OR used = 0)")
            .bind(&hash)
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        Ok(if spent.rows_affected() == 1 { Ok(()) } else { Err(TokenRefusal::Invalid) })
    }

    /// The host whose credential this is, when the connection may use it: a host with a
    /// pinned client certificate only over HTTPS with that certificate (or over plain HTTP,
    /// where nothing can be checked; the broker warns at start).
    pub async fn host_by_credential(&self, credential: &str, transport: &Transport) -> Result<Host> {
        let row = sqlx::query("SELECT * FROM hosts WHERE credential_hash = $1")
            .bind(secret::token_hash(credential))
            .fetch_optional(&self.db.pool)
            .await?;
        let host = row.as_ref().map(Host::from_row).transpose()?.ok_or(Error::Unauthenticated)?;
        if let (Some(pinned), Transport::Https { client_cert_sha256 }) = (&host.client_cert_sha256, transport)
            && client_cert_sha256.as_deref() != Some(pinned.as_str())
        {
            let presented = if client_cert_sha256.is_some() { "another one" } else { "none" };
            tracing::warn!(
                host = %host.name,
                "refused a request with this host's credential: its connection presented {presented} of \
                 the host's pinned client certificate (a stolen credential, or a host whose identity changed)"
            );
            return Err(Error::HostCertificate(format!(
                "host {}'s credential works only with its pinned TLS client certificate, and this connection \
                 presented {presented}; a host with a new identity registers again with a token made to replace it \
                 (`pleiades-broker host token create --name {} --replace`)",
                host.name, host.name
            )));
        }
        Ok(host)
    }

    pub async fn host(&self, id: &str) -> Result<Host> {
        let row =
            sqlx::query("SELECT * FROM hosts WHERE id = $1").bind(id).fetch_optional(&self.db.pool).await?;
        row.as_ref().map(Host::from_row).transpose()?.ok_or_else(|| Error::NotFound("host".into()))
    }

    pub async fn list_hosts(&self, actor: &Actor) -> Result<Vec<Host>> {
        actor.require_admin()?;
        let rows = sqlx::query("SELECT * FROM hosts ORDER BY name").fetch_all(&self.db.pool).await?;
        let images = sqlx::query("SELECT host_id, image_name FROM host_images ORDER BY image_name")
            .fetch_all(&self.db.pool)
            .await?;
        let counts = sqlx::query("SELECT host_id, COUNT(*) AS n FROM desktops WHERE state <> 'failed' AND host_id IS NOT NULL GROUP BY host_id")
            .fetch_all(&self.db.pool)
            .await?;
        let mut hosts: Vec<Host> = rows.iter().map(Host::from_row).collect::<Result<_>>()?;
        for h in &mut hosts {
            for r in &images {
                if get_str(r, "host_id")? == h.id {
                    h.images.push(get_str(r, "image_name")?);
                }
            }
            for r in &counts {
                if get_str(r, "host_id")? == h.id {
                    h.desktops = get_i64(r, "n")?;
                }
            }
        }
        Ok(hosts)
    }

    /// A host's heartbeat: records capacity and what runs, and hands over queued commands.
    pub async fn heartbeat(&self, host: &Host, beat: &Heartbeat) -> Result<HeartbeatReply> {
        check_capacity(beat.cores, beat.memory_mib)?;
        if beat.desktops.len() > MAX_REPORTED || beat.images.len() > MAX_REPORTED {
            return Err(Error::Invalid(format!("heartbeat: at most {MAX_REPORTED} desktops and images")));
        }
        let now = self.now();
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(
            "UPDATE hosts SET cores = $1, memory_mib = $2, last_heartbeat = $3, state = $4 WHERE id = $5",
        )
        .bind(beat.cores)
        .bind(beat.memory_mib)
        .bind(now)
        .bind(HostState::Online.as_str())
        .bind(&host.id)
        .execute(&mut *tx)
        .await?;
        set_host_images(&mut tx, &host.id, &beat.images).await?;
        // Guest log-ins and log-outs seen in the reports, clipboard copies and files that the
        // pools' policies kept back, and USB devices attached or refused, audited after the
        // commit.
        let mut sessions_seen = Vec::new();
        let mut clipboard_denied = Vec::new();
        let mut files_denied = Vec::new();
        let mut usb_events = Vec::new();
        for running in &beat.desktops {
            if let Some(counts) = &running.clipboard {
                clipboard_denied.extend(new_clipboard_denials(&mut tx, &host.id, running, counts).await?);
            }
            if let Some(counts) = &running.files {
                files_denied.extend(new_file_denials(&mut tx, &host.id, running, counts).await?);
            }
            if let Some(counts) = &running.usb {
                usb_events.extend(new_usb_events(&mut tx, &host.id, running, counts).await?);
            }
            // The guest's words, relayed: kept only within the agent channel's limits.
            let guest = running.guest.as_ref().filter(|g| match g.check() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(host = %host.name, desktop = %running.id, "ignored: {e}");
                    false
                }
            });
            if let Some(now_user) = guest.map(|g| g.user.clone()) {
                let before = sqlx::query("SELECT guest FROM desktops WHERE id = $1 AND host_id = $2")
                    .bind(&running.id)
                    .bind(&host.id)
                    .fetch_optional(&mut *tx)
                    .await?;
                let before_user = before
                    .map(|r| get_opt_str(&r, "guest"))
                    .transpose()?
                    .flatten()
                    .and_then(|json| serde_json::from_str::<GuestReport>(&json).ok())
                    .and_then(|g| g.user);
                if before_user != now_user {
                    sessions_seen.push((running.id.clone(), before_user, now_user));
                }
            }
            sqlx::query("UPDATE desktops SET guest = $1 WHERE id = $2 AND host_id = $3")
                .bind(guest.map(|g| serde_json::to_string(g).unwrap_or_default()))
                .bind(&running.id)
                .bind(&host.id)
                .execute(&mut *tx)
                .await?;
            if let Some(bytes) = running.disk_bytes {
                sqlx::query("UPDATE desktops SET disk_bytes = $1 WHERE id = $2 AND host_id = $3")
                    .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
                    .bind(&running.id)
                    .bind(&host.id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(port) = running.port {
                sqlx::query("UPDATE desktops SET session_port = $1 WHERE id = $2 AND host_id = $3")
                    .bind(i64::from(port))
                    .bind(&running.id)
                    .bind(&host.id)
                    .execute(&mut *tx)
                    .await?;
            }
            let row = sqlx::query("SELECT state FROM desktops WHERE id = $1 AND host_id = $2")
                .bind(&running.id)
                .bind(&host.id)
                .fetch_optional(&mut *tx)
                .await?;
            match row.map(|r| DesktopState::parse(&get_str(&r, "state")?)).transpose()? {
                // Not ours (any more), or failed while the host was away: stop it.
                None | Some(DesktopState::Failed) => {
                    queue_command(&mut tx, &host.id, &running.id, CommandKind::Stop, now).await?
                }
                Some(state) if running.connected => {
                    // The user's last input: as the guest counts it when its agent reports
                    // the session (a client can stay connected to a desktop nobody uses),
                    // else now (a connected client is activity).
                    let idle = guest.and_then(|g| g.idle_secs).unwrap_or(0);
                    let last_input = now.saturating_sub(i64::try_from(idle).unwrap_or(i64::MAX));
                    sqlx::query("UPDATE desktops SET last_activity = $1 WHERE id = $2")
                        .bind(last_input)
                        .bind(&running.id)
                        .execute(&mut *tx)
                        .await?;
                    // A disconnect still on its way to the host does not count as a return.
                    let in_flight = sqlx::query(
                        "SELECT COUNT(*) AS n FROM host_commands WHERE desktop_id = $1 AND kind = 'disconnect' AND state IN ('pending', 'sent')",
                    )
                    .bind(&running.id)
                    .fetch_one(&mut *tx)
                    .await?;
                    if state == DesktopState::Disconnected && get_i64(&in_flight, "n")? == 0 {
                        // The user came back with the client: the session is live again
                        // (unless the desktop moved on since it was read).
                        let back = sqlx::query(
                            "UPDATE desktops SET state = $1, state_since = $2 WHERE id = $3 AND state = 'disconnected'",
                        )
                        .bind(DesktopState::InUse.as_str())
                        .bind(now)
                        .bind(&running.id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        if back == 0 {
                            continue;
                        }
                        sqlx::query(
                            "UPDATE sessions SET state = $1 WHERE desktop_id = $2 AND state = 'disconnected'",
                        )
                        .bind(SessionState::Active.as_str())
                        .bind(&running.id)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                Some(_) => {}
            }
        }
        let vanished = self.vanished_desktops(&mut tx, host, beat, now).await?;
        let rows = sqlx::query(
            "SELECT c.id, c.kind, c.desktop_id, c.generation, d.name AS desktop_name, d.pool_id, p.network, p.host_ports, p.lock_on_disconnect, \
             p.clipboard_to_guest, p.clipboard_from_guest, p.file_transfer, p.usb FROM host_commands c \
             LEFT JOIN desktops d ON d.id = c.desktop_id LEFT JOIN pools p ON p.id = d.pool_id \
             WHERE c.host_id = $1 AND c.state = 'pending' ORDER BY c.created_at, c.id",
        )
        .bind(&host.id)
        .fetch_all(&mut *tx)
        .await?;
        let mut commands = Vec::with_capacity(rows.len());
        for r in &rows {
            let id = get_str(r, "id")?;
            // At most once: a command is handed out by the transaction that flips it to sent.
            let taken =
                sqlx::query("UPDATE host_commands SET state = $1 WHERE id = $2 AND state = 'pending'")
                    .bind(CommandState::Sent.as_str())
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
            if taken.rows_affected() != 1 {
                continue;
            }
            let kind = CommandKind::from_name(&get_str(r, "kind")?);
            let desktop_id = get_str(r, "desktop_id")?;
            let pool_id: Option<String> = r.try_get("pool_id")?;
            let lock_on_disconnect =
                kind.boots() && r.try_get::<Option<i64>, _>("lock_on_disconnect")?.is_some_and(|v| v != 0);
            let (image, network, clipboard, file_transfer, usb) = match pool_id {
                Some(_) if kind.boots() => {
                    let network: Option<String> = r.try_get("network")?;
                    let ports: Option<String> = r.try_get("host_ports")?;
                    let network = PoolNetwork::from_columns(
                        network.as_deref().unwrap_or("none"),
                        ports.as_deref().unwrap_or_default(),
                    )?;
                    let allows = |column| -> Result<bool> {
                        Ok(r.try_get::<Option<i64>, _>(column)?.is_none_or(|v| v != 0))
                    };
                    let clipboard = ClipboardPolicy {
                        to_guest: allows("clipboard_to_guest")?,
                        from_guest: allows("clipboard_from_guest")?,
                    };
                    (
                        Some(image_of_desktop(&mut tx, &desktop_id).await?.into()),
                        network.for_host(),
                        Some(clipboard),
                        Some(allows("file_transfer")?),
                        // Stored as the policy writes itself; no device when there is none.
                        Some(r.try_get::<Option<String>, _>("usb")?.unwrap_or_else(|| "none".to_owned())),
                    )
                }
                _ => (None, None, None, None, None),
            };
            commands.push(HostCommand {
                id,
                kind,
                desktop_id,
                desktop_name: r.try_get::<Option<String>, _>("desktop_name")?.unwrap_or_default(),
                image,
                network,
                generation: get_opt_i64(r, "generation")?.and_then(|g| u64::try_from(g).ok()),
                lock_on_disconnect,
                clipboard,
                file_transfer,
                usb,
            });
        }
        tx.commit().await?;
        if host.state != HostState::Online {
            self.audit(&host.name, "host.online", &host.name, "heartbeat after loss").await?;
        }
        for name in vanished {
            tracing::warn!(host = %host.name, desktop = %name, "desktop no longer runs on its host");
            self.audit(&host.name, "desktop.vanished", &name, "not running on its host").await?;
        }
        // The guest's own words: who logged in or out of its graphical session.
        for (desktop, before, now) in sessions_seen {
            if let Some(user) = before {
                self.audit("guest", "guest.logout", &desktop, &user).await?;
            }
            if let Some(user) = now {
                self.audit("guest", "guest.login", &desktop, &user).await?;
            }
        }
        // The host's count, not the guest's: the host enforces the policy.
        for (desktop, direction, copies) in clipboard_denied {
            self.audit(&host.name, "clipboard.denied", &desktop, &denial_detail(direction, copies)).await?;
        }
        for (desktop, files) in files_denied {
            let noun = if files == 1 { "file" } else { "files" };
            let detail = format!("{files} {noun} from the client refused by the pool's policy");
            self.audit(&host.name, "files.denied", &desktop, &detail).await?;
        }
        for (desktop, event, devices) in usb_events {
            self.audit(&host.name, event.action(), &desktop, &event.detail(devices)).await?;
        }
        Ok(HeartbeatReply { commands, heartbeat_interval_secs: self.settings.heartbeat_interval_secs })
    }

    /// Desktops that should run on the host but that it no longer reports (the VM died):
    /// failed, their sessions ended. Only desktops settled for two heartbeat intervals with no
    /// command in flight count, so that a heartbeat racing a start acknowledgement is harmless.
    async fn vanished_desktops(
        &self,
        tx: &mut Transaction<'_, Any>,
        host: &Host,
        beat: &Heartbeat,
        now: i64,
    ) -> Result<Vec<String>> {
        let settled = now - 2 * self.settings.heartbeat_interval_secs as i64;
        let expected = sqlx::query(
            "SELECT id, name FROM desktops d WHERE host_id = $1 AND state IN ('ready', 'in_use', 'disconnected') AND state_since < $2 \
             AND NOT EXISTS (SELECT 1 FROM host_commands c WHERE c.desktop_id = d.id AND c.state IN ('pending', 'sent'))",
        )
        .bind(&host.id)
        .bind(settled)
        .fetch_all(&mut **tx)
        .await?;
        let mut vanished = Vec::new();
        for row in &expected {
            let id = get_str(row, "id")?;
            if beat.desktops.iter().any(|d| d.id == id) {
                continue;
            }
            let reason = format!("its VM no longer runs on host {}", host.name);
            self.mark_failed(tx, &id, &reason, "vm_lost", now).await?;
            vanished.push(get_str(row, "name")?);
        }
        Ok(vanished)
    }

    /// The host finished (or failed) a command.
    pub async fn ack_command(&self, host: &Host, command_id: &str, ack: &CommandAck) -> Result<()> {
        let now = self.now();
        let row = sqlx::query(
            "SELECT kind, desktop_id FROM host_commands WHERE id = $1 AND host_id = $2 AND state = 'sent'",
        )
        .bind(command_id)
        .bind(&host.id)
        .fetch_optional(&self.db.pool)
        .await?
        .ok_or_else(|| Error::NotFound("command".into()))?;
        let kind = CommandKind::from_name(&get_str(&row, "kind")?);
        let desktop_id = get_str(&row, "desktop_id")?;
        let mut tx = self.db.pool.begin().await?;
        // Conditional on the state read above: of two answers to one command (a retried
        // request), or an answer racing the command's timeout, one wins and the other changes
        // nothing (on PostgreSQL, where the read and this write are not under one lock).
        let answered =
            sqlx::query("UPDATE host_commands SET state = $1, error = $2 WHERE id = $3 AND state = 'sent'")
                .bind(if ack.ok { CommandState::Done } else { CommandState::Failed }.as_str())
                .bind(ack.error.clone())
                .bind(command_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if answered == 0 {
            tx.rollback().await?;
            return Err(Error::NotFound("command (answered already, or timed out)".into()));
        }
        if !ack.ok {
            sqlx::query("UPDATE hosts SET last_error = $1 WHERE id = $2")
                .bind(truncate_reason(&format!(
                    "{kind} {desktop_id}: {}",
                    ack.error.as_deref().unwrap_or("no reason given")
                )))
                .bind(&host.id)
                .execute(&mut *tx)
                .await?;
        }
        if let (true, Some(port)) = (ack.ok, ack.port) {
            sqlx::query("UPDATE desktops SET session_port = $1 WHERE id = $2 AND host_id = $3")
                .bind(i64::from(port))
                .bind(&desktop_id)
                .bind(&host.id)
                .execute(&mut *tx)
                .await?;
        }
        if ack.ok && kind.boots() {
            // A new VM process, whose clipboard, file-transfer and USB counters start at zero.
            sqlx::query(
                "UPDATE desktops SET clipboard_denied_to_guest = 0, clipboard_denied_from_guest = 0, files_denied = 0, \
                 usb_attached = 0, usb_denied = 0 WHERE id = $1 AND host_id = $2",
            )
            .bind(&desktop_id)
            .bind(&host.id)
            .execute(&mut *tx)
            .await?;
        }
        match (kind, ack.ok) {
            (CommandKind::Start | CommandKind::Restart, true) => {
                sqlx::query(
                    "UPDATE desktops SET state = CASE WHEN user_id IS NULL THEN $1 ELSE $2 END, state_since = $3, last_activity = $3, \
                     start_failures = 0, last_error = NULL, retry_at = 0 WHERE id = $4 AND state = 'provisioning'",
                )
                .bind(DesktopState::Ready.as_str())
                .bind(DesktopState::InUse.as_str())
                .bind(now)
                .bind(&desktop_id)
                .execute(&mut *tx)
                .await?;
            }
            (CommandKind::Recycle, true) => {
                sqlx::query("UPDATE desktops SET state = $1, user_id = NULL, state_since = $2 WHERE id = $3 AND state = 'recycling'")
                    .bind(DesktopState::Ready.as_str())
                    .bind(now)
                    .bind(&desktop_id)
                    .execute(&mut *tx)
                    .await?;
            }
            (_, false) if kind.boots() => {
                let reason = ack.error.as_deref().unwrap_or("the host gave no reason");
                self.mark_failed(&mut tx, &desktop_id, reason, "start_failed", now).await?;
            }
            _ => {}
        }
        tx.commit().await?;
        if !ack.ok {
            self.audit(
                &host.name,
                &format!("host.{kind}.failed"),
                &desktop_id,
                ack.error.as_deref().unwrap_or(""),
            )
            .await?;
        }
        Ok(())
    }
}

/// How a host API request reached the broker: `server::serve` puts it in every request's
/// extensions (a request without one is treated as HTTPS without a client certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP (`insecure_http`: loopback tests, or a TLS proxy in front): no client
    /// certificate can be presented, so a host is known by its credential alone.
    PlainHttp,
    /// HTTPS; the SHA-256 of the client certificate whose key the peer proved it holds in the
    /// handshake, when it presented one.
    Https { client_cert_sha256: Option<String> },
}

/// Why a registration token does not register a name (audited; the host only learns 401, or
/// 409 when its token is good but the name is taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenRefusal {
    /// Unknown, expired or spent.
    Invalid,
    /// Made for another host name.
    OtherName,
    /// The name is registered and the token was not made to replace that host.
    NameRegistered,
}

impl std::fmt::Display for TokenRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Invalid => "no valid token",
            Self::OtherName => "the token is for another host name",
            Self::NameRegistered => "the name is registered and the token does not replace it",
        })
    }
}

async fn set_host_images(tx: &mut Transaction<'_, Any>, host_id: &str, images: &[String]) -> Result<()> {
    sqlx::query("DELETE FROM host_images WHERE host_id = $1").bind(host_id).execute(&mut **tx).await?;
    let mut seen = std::collections::HashSet::new();
    for image in images.iter().filter(|i| seen.insert(i.as_str())) {
        sqlx::query("INSERT INTO host_images (host_id, image_name) VALUES ($1, $2)")
            .bind(host_id)
            .bind(image)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// The clipboard copies of a running desktop that its pool's policy kept back since the last
/// heartbeat, per direction: the host reports totals of the desktop's VM process, the desktop
/// row keeps those already audited. A total below the audited one is a new VM process (the
/// broker resets its count when a boot is acknowledged, but a process can restart without a
/// command): all of it is new. Returns the desktop's name, the direction and how many.
async fn new_clipboard_denials(
    tx: &mut Transaction<'_, Any>,
    host_id: &str,
    running: &RunningDesktop,
    counts: &ClipboardCounts,
) -> Result<Vec<(String, Direction, i64)>> {
    let row = sqlx::query(
        "SELECT name, clipboard_denied_to_guest, clipboard_denied_from_guest FROM desktops WHERE id = $1 AND host_id = $2",
    )
    .bind(&running.id)
    .bind(host_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(Vec::new()) };
    let reported = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let (to_guest, from_guest) = (reported(counts.denied_to_guest), reported(counts.denied_from_guest));
    let audited =
        (get_i64(&row, "clipboard_denied_to_guest")?, get_i64(&row, "clipboard_denied_from_guest")?);
    if (to_guest, from_guest) == audited {
        return Ok(Vec::new());
    }
    sqlx::query(
        "UPDATE desktops SET clipboard_denied_to_guest = $1, clipboard_denied_from_guest = $2 WHERE id = $3 AND host_id = $4",
    )
    .bind(to_guest)
    .bind(from_guest)
    .bind(&running.id)
    .bind(host_id)
    .execute(&mut **tx)
    .await?;
    let new = |total: i64, audited: i64| if total >= audited { total - audited } else { total };
    let name = get_str(&row, "name")?;
    Ok([(Direction::ToGuest, new(to_guest, audited.0)), (Direction::FromGuest, new(from_guest, audited.1))]
        .into_iter()
        .filter(|&(_, copies)| copies > 0)
        .map(|(direction, copies)| (name.clone(), direction, copies))
        .collect())
}

/// The files offered to a running desktop that its pool's policy refused since the last
/// heartbeat, counted as [`new_clipboard_denials`] counts copies: the host reports the total of
/// the desktop's VM process, the desktop row keeps the one already audited, and a total below
/// it is a new VM process whose denials are all new. Returns the desktop's name and how many,
/// when there are any.
async fn new_file_denials(
    tx: &mut Transaction<'_, Any>,
    host_id: &str,
    running: &RunningDesktop,
    counts: &FileCounts,
) -> Result<Option<(String, i64)>> {
    let row = sqlx::query("SELECT name, files_denied FROM desktops WHERE id = $1 AND host_id = $2")
        .bind(&running.id)
        .bind(host_id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let total = i64::try_from(counts.denied).unwrap_or(i64::MAX);
    let audited = get_i64(&row, "files_denied")?;
    if total == audited {
        return Ok(None);
    }
    sqlx::query("UPDATE desktops SET files_denied = $1 WHERE id = $2 AND host_id = $3")
        .bind(total)
        .bind(&running.id)
        .bind(host_id)
        .execute(&mut **tx)
        .await?;
    let new = if total >= audited { total - audited } else { total };
    if new == 0 {
        return Ok(None);
    }
    Ok(Some((get_str(&row, "name")?, new)))
}

/// What a running desktop's VM process did with a USB device, as the broker audits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UsbEvent {
    /// In the guest (`usb.attached`).
    Attached,
    /// Refused by the pool's policy (`usb.denied`).
    Denied,
}

impl UsbEvent {
    fn action(self) -> &'static str {
        match self {
            UsbEvent::Attached => "usb.attached",
            UsbEvent::Denied => "usb.denied",
        }
    }

    /// The audit's words: how many devices, and what became of them.
    fn detail(self, devices: i64) -> String {
        let noun = if devices == 1 { "USB device" } else { "USB devices" };
        match self {
            UsbEvent::Attached => format!("{devices} {noun} from the client attached in the desktop"),
            UsbEvent::Denied => format!("{devices} {noun} from the client refused by the pool's policy"),
        }
    }
}

/// The USB devices that a running desktop's VM process attached in the guest, and those its
/// pool's policy refused, since the last heartbeat: counted as [`new_clipboard_denials`] counts
/// copies (the host reports the totals of the desktop's VM process, the desktop row keeps those
/// already audited, and a total below the audited one is a new VM process whose events are all
/// new). Returns the desktop's name, the event and how many devices.
async fn new_usb_events(
    tx: &mut Transaction<'_, Any>,
    host_id: &str,
    running: &RunningDesktop,
    counts: &UsbCounts,
) -> Result<Vec<(String, UsbEvent, i64)>> {
    let row =
        sqlx::query("SELECT name, usb_attached, usb_denied FROM desktops WHERE id = $1 AND host_id = $2")
            .bind(&running.id)
            .bind(host_id)
            .fetch_optional(&mut **tx)
            .await?;
    let Some(row) = row else { return Ok(Vec::new()) };
    let reported = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let (attached, denied) = (reported(counts.attached), reported(counts.denied));
    let audited = (get_i64(&row, "usb_attached")?, get_i64(&row, "usb_denied")?);
    if (attached, denied) == audited {
        return Ok(Vec::new());
    }
    sqlx::query("UPDATE desktops SET usb_attached = $1, usb_denied = $2 WHERE id = $3 AND host_id = $4")
        .bind(attached)
        .bind(denied)
        .bind(&running.id)
        .bind(host_id)
        .execute(&mut **tx)
        .await?;
    let new = |total: i64, audited: i64| if total >= audited { total - audited } else { total };
    let name = get_str(&row, "name")?;
    Ok([(UsbEvent::Attached, new(attached, audited.0)), (UsbEvent::Denied, new(denied, audited.1))]
        .into_iter()
        .filter(|&(_, devices)| devices > 0)
        .map(|(event, devices)| (name.clone(), event, devices))
        .collect())
}

/// The `clipboard.denied` audit's words: how many copies, from where, kept back which way.
fn denial_detail(direction: Direction, copies: i64) -> String {
    let (from, way) = match direction {
        Direction::ToGuest => ("the client", "to-guest"),
        Direction::FromGuest => ("the desktop", "from-guest"),
    };
    let noun = if copies == 1 { "copy" } else { "copies" };
    format!("{copies} {noun} from {from} kept back by the pool's policy ({way})")
}

/// The most desktops or images one host may report (a host is a machine, not a fleet).
const MAX_REPORTED: usize = 4096;

/// What a host says it has is what placement trusts: within what one machine can have.
fn check_capacity(cores: i64, memory_mib: i64) -> Result<()> {
    if !(1..=4096).contains(&cores) || !(64..=(64 << 20)).contains(&memory_mib) {
        return Err(Error::Invalid(format!(
            "host capacity: 1-4096 cores and 64 MiB-64 TiB of memory, not {cores} cores and {memory_mib} MiB"
        )));
    }
    Ok(())
}
