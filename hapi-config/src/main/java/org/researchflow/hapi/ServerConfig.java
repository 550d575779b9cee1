package org.researchflow.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.SubscriptionTriggeringProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.subscription.submit.interceptor.SubscriptionMatcherInterceptor;
import ca.uhn.fhir.jpa.subscription.submit.interceptor.SynchronousSubscriptionMatcherInterceptor;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import javax.sql.DataSource;
import org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.autoconfigure.orm.jpa.JpaProperties;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

/** The beans HAPI's configurations expect the application to provide. */
@Configuration
@EnableTransactionManagement
public class ServerConfig {

	private static final Logger LOG = LoggerFactory.getLogger(ServerConfig.class);

	@Bean
	public JpaStorageSettings storageSettings(HapiProperties properties) {
		if (!"R4".equalsIgnoreCase(properties.getFhirVersion())) {
			throw new IllegalStateException(
					"hapi.fhir.fhir_version must be R4, not " + properties.getFhirVersion());
		}
		// HAPI's defaults otherwise: deletes allowed, history kept, client ids alphanumeric.
		JpaStorageSettings settings = new JpaStorageSettings();
		settings.setReuseCachedSearchResultsForMillis(properties.getReuseCachedSearchResultsMillis());
		return settings;
	}

	@Bean
	public SubscriptionSettings subscriptionSettings(HapiProperties properties) {
		HapiProperties.Subscription wanted = properties.getSubscription();
		SubscriptionSettings settings = new SubscriptionSettings();
		if (wanted.isResthookEnabled()) {
			settings.addSupportedSubscriptionType(SubscriptionChannelType.RESTHOOK);
		}
		if (wanted.isWebsocketEnabled()) {
			settings.addSupportedSubscriptionType(SubscriptionChannelType.WEBSOCKET);
		}
		settings.setSubscriptionChangeQueuedImmediately(wanted.isImmediatelyQueued());
		LOG.info(
				"Subscriptions: rest-hook {}, changes queued {}",
				wanted.isResthookEnabled() ? "on" : "off",
				wanted.isImmediatelyQueued() ? "immediately" : "by the periodic sweep");
		return settings;
	}

	/**
	 * What {@code immediately_queued} means here: every change goes to subscription matching
	 * right after its transaction commits.
	 *
	 * <p>HAPI 8.8's own setting ({@code SubscriptionSettings.setSubscriptionChangeQueuedImmediately})
	 * only does this for Subscription resources; every other change is parked in
	 * HFJ_RESOURCE_MODIFIED and submitted by a job every 5 s, which would put 0-5 s into each
	 * delivery. HAPI ships the after-commit variant of its matcher interceptor
	 * ({@link SynchronousSubscriptionMatcherInterceptor}) but selects it only when scheduling is
	 * disabled for tests; it is chosen here instead ({@code @Primary} over HAPI's bean). A
	 * submission that fails is still parked for the 5 s job, HAPI's safety net.
	 */
	@Primary
	@Bean
	public SubscriptionMatcherInterceptor immediateSubscriptionMatcherInterceptor(HapiProperties properties) {
		return properties.getSubscription().isImmediatelyQueued()
				? new SynchronousSubscriptionMatcherInterceptor()
				: new SubscriptionMatcherInterceptor();
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	/** No e-mail channel is offered; HAPI's subscription processor still asks for a sender. */
	@Bean
	public IEmailSender emailSender() {
		return details -> LOG.warn("E-mail subscriptions are not supported here; message dropped");
	}

	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource,
			JpaProperties jpaProperties) {
		LocalContainerEntityManagerFactoryBean factory =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		factory.setPersistenceUnitName("HAPI_PU");
		factory.setDataSource(dataSource);
		// spring.jpa.properties.* from application.yaml: dialect, schema update, Hibernate Search off.
		factory.setJpaPropertyMap(jpaProperties.getProperties());
		return factory;
	}

	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		return new JpaTransactionManager(entityManagerFactory);
	}

	@Bean
	public RestfulServer restfulServer(
			FhirContext fhirContext,
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			IJpaSystemProvider systemProvider,
			SubscriptionTriggeringProvider triggeringProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DatabaseBackedPagingProvider pagingProvider) {
		RestfulServer server = new RestfulServer(fhirContext);
		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		// POST [base]/Subscription/{id}/$trigger-subscription
		server.registerProvider(triggeringProvider);
		server.setServerConformanceProvider(new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport));
		server.setPagingProvider(pagingProvider);
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		return server;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServlet(RestfulServer server) {
		ServletRegistrationBean<RestfulServer> registration = new ServletRegistrationBean<>(server, "/fhir/*");
		registration.setName("fhir");
		registration.setLoadOnStartup(1);
		return registration;
	}
}
